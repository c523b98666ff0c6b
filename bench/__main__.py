"""``make bench``: every benchmark in turn, then the report in ``bench/results/latest.md``.

Usage: ``python -m bench [--quick] [--only NAME[,NAME...]] [--out FILE]`` as root.

Each benchmark makes its own pool, broker, bridge and agent and removes them after itself.
A benchmark never fails on a number: the exit status is 0 when every benchmark ran, 1 when
one could not run (its row says why; the others still run and are reported), 130 on Ctrl-C.
``--quick`` runs small numbers and writes no report unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Final

from bench import children, common, dispatch, scale, serving, snapshots
from bench.common import Benchmark, Row

BENCHMARKS: Final[dict[str, Benchmark]] = {
    "dispatch": dispatch.run,
    "create-to-serving": serving.run,
    "scale": scale.run,
    "snapshots": snapshots.run,
    "children": children.run,
}
REPORT: Final = Path(__file__).parent / "results" / "latest.md"

NOTES: Final = """\
## How to read it

- **agent** and **raw** are measured in the same run, alternating where the benchmark
  repeats, so the ratio holds on a noisy shared machine; the absolute numbers do not.
- **dispatch**: the same client sends the same `volume.get` task messages to the agent (round
  trip to the terminal event) and to a raw MQTT echo on the same broker (round trip to the
  echoed bytes). A `volume.get` also reads the volume and its snapshots from ZFS (one
  `zfs get -d 1`; under load the agent joins concurrent reads into one command): the raw
  cost of that read is on its own line.
- **create-to-serving**: from publishing `volume.create` to the first successful `nfs-ls`
  of the new export from a client namespace; raw is a script doing zfs create and quota,
  namespace and veth, rpcbind and ganesha, then the same read.
- **scale**: zfs-fuse mounts at most 1,000 file systems per daemon, so 1,000 served volumes
  cannot be had. 100 volumes are created through the agent (zones running); 900 volume
  datasets are written as the agent writes them but with `canmount=off`, and the agent's
  first start adopts them as `failed` (it cannot mount them). The measured 1,000-volume
  reconciliation is a warm restart: the journal knows the 1,000 volumes, the 100 running
  zones are adopted (not restarted), the 900 failed volumes without a zone are left alone.
  The 100-zone case is measured on its own before the 900 are added.
- **children**: `proc.run(["true"])`, the way every `zfs` and `ip` command is run, against
  a bare `posix_spawnp` and blocking `waitpid` (no pipes, no loop); "our CPU" is this
  process's time per child, not the child's.
- **snapshots**: the agent checks the snapshot list before and records it after each task;
  a rollback also stops and starts the volume's NFS server (ganesha caches what a rollback
  changes), so that ratio is mostly a zone restart.
"""


def main() -> int:
    """Run the benchmarks asked for; write the report; the exit status."""
    parser = argparse.ArgumentParser(description="volagent benchmarks (issue 8)")
    parser.add_argument("--quick", action="store_true", help="small numbers, for development")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, help=f"report file (default {REPORT})")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks run as root (pools, namespaces, zones)", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    common.prepare()
    began = time.monotonic()
    rows: list[Row] = []
    timings: list[str] = []
    failed = False
    try:
        for name in names:
            print(f"== {name}", flush=True)
            started = time.monotonic()
            try:
                rows += BENCHMARKS[name](args.quick)
            except Exception as exc:  # noqa: BLE001  # reported in its row; the others still run
                traceback.print_exc()
                rows.append(Row(name, f"could not run: {exc}".replace("|", "/"), "—", "—"))
                failed = True
            timings.append(f"{name} {time.monotonic() - started:.0f} s")
    except KeyboardInterrupt:
        print("interrupted; everything made was removed", file=sys.stderr)
        return 130
    took = time.monotonic() - began
    print(common.table(rows))
    out = args.out or (None if args.quick else REPORT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report(rows, took, timings, quick=args.quick))
        print(f"report written to {out}")
    print(f"({took:.0f} s)")
    return 1 if failed else 0


def report(rows: list[Row], took: float, timings: list[str], *, quick: bool) -> str:
    """The markdown report."""
    kind = "quick run (small numbers)" if quick else "full run"
    return "\n".join(
        [
            "# volagent benchmarks",
            "",
            f"{common.utc_now()}, {kind}, {took / 60:.1f} min in all ({', '.join(timings)}).",
            "",
            common.table(rows),
            "",
            "## Machine",
            "",
            *common.machine_facts(),
            "",
            NOTES,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
