"""How the demo talks: numbered headings, a sentence or two, commands and their trimmed output.

Colours (bold headings, green ``ok``, red ``FAILED``) only when the output is a terminal and
``NO_COLOR`` is not set. Everything else is plain text, so a captured run reads the same.
"""

from __future__ import annotations

import os
import shlex
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TextIO

__all__ = ["StepRow", "Terminal"]

_BOLD: Final = "1"
_DIM: Final = "2"
_RED: Final = "31"
_GREEN: Final = "32"
_YELLOW: Final = "33"
_CYAN: Final = "36"
_MAX_WIDTH: Final = 100
_INDENT: Final = "   "
_OUTPUT_INDENT: Final = "      "


@dataclass(frozen=True)
class StepRow:
    """One line of the summary: the step, how it ended and how long it took."""

    title: str
    state: str  # "ok", "FAILED" or "skipped"
    seconds: float


class Terminal:
    """Writes the demo's story to ``out``."""

    def __init__(self, out: TextIO) -> None:
        """Tell the story on ``out``; in colour when it is a terminal and NO_COLOR is unset."""
        self._out = out
        self._colour = out.isatty() and "NO_COLOR" not in os.environ
        columns = shutil.get_terminal_size((_MAX_WIDTH, 24)).columns
        self.width = max(60, min(_MAX_WIDTH, columns))

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self._colour else text

    def _write(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def title(self, text: str) -> None:
        """The demo's first line."""
        self._write(self._paint(text, _BOLD))

    def heading(self, number: int, total: int, text: str) -> None:
        """A numbered step heading, after a blank line."""
        self._write("")
        self._write(self._paint(f"[{number}/{total}] {text}", f"{_BOLD};{_CYAN}"))

    def say(self, text: str) -> None:
        """A short explanation, wrapped to the terminal."""
        self._write(
            textwrap.fill(text, width=self.width, initial_indent=_INDENT, subsequent_indent=_INDENT)
        )

    def command(self, argv: Sequence[str]) -> None:
        """The command about to run, as one would type it (long ones wrapped with a backslash)."""
        words: list[str] = []
        for arg in argv:  # an option and its value stay on one line
            option = bool(words) and words[-1].startswith("--") and " " not in words[-1]
            if option and not arg.startswith("-"):
                words[-1] += " " + shlex.quote(arg)
            else:
                words.append(shlex.quote(arg))
        lines: list[str] = []
        line = "$"
        limit = self.width - len(_INDENT) - 2
        for word in words:
            if len(line) + 1 + len(word) > limit and line.strip() != "$":
                lines.append(line + " \\")
                line = "     "
            line += " " + word
        lines.append(line)
        for text in lines:
            self._write(_INDENT + self._paint(text, _DIM))

    def output(self, text: str, *, limit: int = 14) -> None:
        """A command's output, indented; beyond ``limit`` lines only the first ones and a count."""
        lines = text.rstrip("\n").splitlines()
        shown = lines if len(lines) <= limit else lines[: limit - 1]
        for line in shown:
            self._write(_OUTPUT_INDENT + line)
        if len(shown) < len(lines):
            self._write(_OUTPUT_INDENT + f"... ({len(lines) - len(shown)} more lines)")

    def good(self, text: str) -> None:
        """Something that went as expected."""
        self._write(_INDENT + self._paint("ok", _GREEN) + "  " + text)

    def bad(self, text: str) -> None:
        """Something that did not."""
        self._write(_INDENT + self._paint("FAILED", _RED) + "  " + text)

    def note(self, text: str) -> None:
        """A remark that is neither a success nor a failure."""
        self._write(_INDENT + self._paint("note", _YELLOW) + "  " + text)

    def block(self, title: str, lines: Sequence[str]) -> None:
        """A titled block of lines (how to use the node kept running, a log tail)."""
        self._write("")
        self._write(self._paint(title, _BOLD))
        for line in lines:
            self._write(_INDENT + line)

    def summary(self, rows: Sequence[StepRow], total_s: float, notes: Sequence[str]) -> None:
        """The table of steps, their results and times, ``notes``, and the verdict line."""
        width = max(len(row.title) for row in rows)
        self._write("")
        self._write(self._paint("Summary", _BOLD))
        for number, row in enumerate(rows, start=1):
            state = row.state.ljust(7)
            if row.state == "ok":
                state = self._paint(state, _GREEN)
            elif row.state == "FAILED":
                state = self._paint(state, _RED)
            took = f"{row.seconds:6.2f} s" if row.state != "skipped" else ""
            self._write(f"{_INDENT}{number:>2}. {row.title.ljust(width)}  {state} {took}".rstrip())
        for line in notes:
            self._write(f"{_INDENT}{line}")
        failed = sum(row.state != "ok" for row in rows)
        if failed:
            verdict = f"demo: {failed} of {len(rows)} steps did not pass ({total_s:.1f} s)"
            self._write(self._paint(verdict, f"{_BOLD};{_RED}"))
        else:
            verdict = f"demo: all {len(rows)} steps passed in {total_s:.1f} s"
            self._write(self._paint(verdict, f"{_BOLD};{_GREEN}"))
