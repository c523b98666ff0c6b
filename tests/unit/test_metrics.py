from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from volagent.metrics import CONTENT_TYPE, DURATION_BUCKETS, PROBE_BUCKETS, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.render().decode("utf-8")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def label_values(metrics: Metrics, name: str, label: str) -> set[str]:
    return {dict(key)[label] for (sample, key) in samples(metrics) if sample == name}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(version="1.2.3")


def test_build_info_names_the_version(metrics: Metrics) -> None:
    assert value(metrics, "volagent_build_info", version="1.2.3") == 1.0
    assert label_values(metrics, "volagent_build_info", "version") == {"1.2.3"}


def test_every_family_says_what_it_counts(metrics: Metrics) -> None:
    families = list(text_string_to_metric_families(metrics.render().decode()))
    names = {f.name for f in families}
    assert {
        "volagent_tasks_received",
        "volagent_tasks",
        "volagent_task_failures",
        "volagent_task_duration_seconds",
        "volagent_invalid_messages",
        "volagent_task_queue_depth",
        "volagent_tasks_running",
        "volagent_broker_connected",
        "volagent_broker_reconnects",
        "volagent_zones",
        "volagent_zone_restarts",
        "volagent_nfs_probe_seconds",
        "volagent_volumes",
        "volagent_pool_size_bytes",
        "volagent_pool_free_bytes",
        "volagent_volume_used_bytes",
        "volagent_outbox_depth",
        "volagent_outbox_oldest_age_seconds",
        "volagent_central_errors",
        "volagent_build_info",
    } <= names
    for family in families:
        assert len(family.documentation) > 10, family.name


def test_content_type_is_the_text_format_0_0_4() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert Metrics.CONTENT_TYPE == CONTENT_TYPE


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.task_received("volume.create")
    assert value(a, "volagent_tasks_received_total", kind="volume.create") == 1.0
    assert value(b, "volagent_tasks_received_total", kind="volume.create") is None
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "volagent_" not in global_text


def test_received_tasks_are_counted_by_kind(metrics: Metrics) -> None:
    metrics.task_received("volume.create")
    metrics.task_received("volume.create")
    metrics.task_received("snapshot.list")
    assert value(metrics, "volagent_tasks_received_total", kind="volume.create") == 2.0
    assert value(metrics, "volagent_tasks_received_total", kind="snapshot.list") == 1.0


def test_kinds_the_agent_does_not_know_share_one_label(metrics: Metrics) -> None:
    for kind in ("volume.explode", "x", "", "volume.explode2"):
        metrics.task_received(kind)
        metrics.task_finished(kind, "failed", "UnknownTaskKind", 0.0)
    assert label_values(metrics, "volagent_tasks_received_total", "kind") == {"unknown"}
    assert value(metrics, "volagent_tasks_received_total", kind="unknown") == 4.0
    assert (
        value(metrics, "volagent_task_failures_total", kind="unknown", code="UnknownTaskKind") == 4
    )


def test_finished_tasks_are_counted_by_outcome_and_failures_by_code(metrics: Metrics) -> None:
    metrics.task_finished("volume.create", "succeeded", None, 0.2)
    metrics.task_finished("volume.create", "failed", "InsufficientSpace", 0.1)
    metrics.task_finished("volume.create", "failed", "InsufficientSpace", 0.1)
    metrics.task_finished("volume.delete", "failed", None, 0.1)
    tasks = "volagent_tasks_total"
    assert value(metrics, tasks, kind="volume.create", outcome="succeeded") == 1.0
    assert value(metrics, tasks, kind="volume.create", outcome="failed") == 2.0
    assert value(metrics, tasks, kind="volume.delete", outcome="failed") == 1.0
    failures = "volagent_task_failures_total"
    assert value(metrics, failures, kind="volume.create", code="InsufficientSpace") == 2.0
    assert value(metrics, failures, kind="volume.delete", code="Internal") == 1.0
    assert label_values(metrics, failures, "code") == {"InsufficientSpace", "Internal"}


def test_an_outcome_other_than_succeeded_or_failed_is_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="outcome"):
        metrics.task_finished("volume.create", "running", None, 1.0)
    assert value(metrics, "volagent_tasks_total", kind="volume.create", outcome="running") is None


def test_task_durations_land_in_their_buckets(metrics: Metrics) -> None:
    assert DURATION_BUCKETS[0] == 0.001
    assert DURATION_BUCKETS[-1] == 600.0
    metrics.task_finished("volume.resize", "succeeded", None, 0.003)
    metrics.task_finished("volume.resize", "succeeded", None, 45.0)
    name = "volagent_task_duration_seconds_bucket"
    assert value(metrics, name, kind="volume.resize", le="0.0025") == 0.0
    assert value(metrics, name, kind="volume.resize", le="0.005") == 1.0
    assert value(metrics, name, kind="volume.resize", le="30.0") == 1.0
    assert value(metrics, name, kind="volume.resize", le="60.0") == 2.0
    assert value(metrics, name, kind="volume.resize", le="+Inf") == 2.0
    assert value(metrics, "volagent_task_duration_seconds_count", kind="volume.resize") == 2.0
    total = value(metrics, "volagent_task_duration_seconds_sum", kind="volume.resize")
    assert total == pytest.approx(45.003)


def test_invalid_messages_are_counted_by_reason(metrics: Metrics) -> None:
    metrics.invalid_message("not_json")
    metrics.invalid_message("not_json")
    metrics.invalid_message("too_large")
    assert value(metrics, "volagent_invalid_messages_total", reason="not_json") == 2.0
    assert value(metrics, "volagent_invalid_messages_total", reason="too_large") == 1.0


def test_queue_depth_follows_the_latest_values(metrics: Metrics) -> None:
    metrics.set_queue_depth(5, 2)
    assert value(metrics, "volagent_task_queue_depth") == 5.0
    assert value(metrics, "volagent_tasks_running") == 2.0
    metrics.set_queue_depth(0, 1)
    assert value(metrics, "volagent_task_queue_depth") == 0.0
    assert value(metrics, "volagent_tasks_running") == 1.0


def test_broker_state_and_reconnects_fed_as_a_running_total(metrics: Metrics) -> None:
    reconnects = "volagent_broker_reconnects_total"
    assert value(metrics, "volagent_broker_connected") == 0.0
    metrics.set_broker(connected=True, reconnects=0)
    assert value(metrics, "volagent_broker_connected") == 1.0
    assert value(metrics, reconnects) == 0.0
    metrics.set_broker(connected=False, reconnects=2)
    metrics.set_broker(connected=False, reconnects=2)
    assert value(metrics, "volagent_broker_connected") == 0.0
    assert value(metrics, reconnects) == 2.0
    metrics.set_broker(connected=True, reconnects=5)
    assert value(metrics, reconnects) == 5.0
    # A new adapter counts from zero again: the counter never goes down.
    metrics.set_broker(connected=True, reconnects=1)
    assert value(metrics, reconnects) == 6.0
    metrics.set_broker(connected=True, reconnects=3)
    assert value(metrics, reconnects) == 8.0


def test_zone_states_always_show_and_vanished_ones_go(metrics: Metrics) -> None:
    assert label_values(metrics, "volagent_zones", "state") == {"running", "stopped", "failed"}
    metrics.set_zones({"running": 3})
    assert value(metrics, "volagent_zones", state="running") == 3.0
    assert value(metrics, "volagent_zones", state="stopped") == 0.0
    assert value(metrics, "volagent_zones", state="failed") == 0.0
    metrics.set_zones({"running": 1, "failed": 2, "starting": 1})
    assert value(metrics, "volagent_zones", state="starting") == 1.0
    assert value(metrics, "volagent_zones", state="failed") == 2.0
    metrics.set_zones({})
    assert label_values(metrics, "volagent_zones", "state") == {"running", "stopped", "failed"}
    assert value(metrics, "volagent_zones", state="running") == 0.0


def test_zone_restarts_and_probe_latency(metrics: Metrics) -> None:
    metrics.zone_restarted()
    metrics.zone_restarted()
    assert value(metrics, "volagent_zone_restarts_total") == 2.0
    assert PROBE_BUCKETS[0] == 0.0001
    assert PROBE_BUCKETS[-1] == 10.0
    metrics.observe_probe(0.0002)
    metrics.observe_probe(3.0)
    name = "volagent_nfs_probe_seconds_bucket"
    assert value(metrics, name, le="0.0001") == 0.0
    assert value(metrics, name, le="0.00025") == 1.0
    assert value(metrics, name, le="2.5") == 1.0
    assert value(metrics, name, le="5.0") == 2.0
    assert value(metrics, "volagent_nfs_probe_seconds_count") == 2.0


def test_volume_states_always_show(metrics: Metrics) -> None:
    states = {"creating", "ready", "failed", "deleting", "deleted"}
    assert label_values(metrics, "volagent_volumes", "state") == states
    metrics.set_volumes({"ready": 7, "creating": 1})
    assert value(metrics, "volagent_volumes", state="ready") == 7.0
    assert value(metrics, "volagent_volumes", state="creating") == 1.0
    metrics.set_volumes({"ready": 6})
    assert value(metrics, "volagent_volumes", state="creating") == 0.0
    assert value(metrics, "volagent_volumes", state="ready") == 6.0


def test_pool_size_and_free(metrics: Metrics) -> None:
    metrics.set_pool(10 * 2**30, 4 * 2**30)
    assert value(metrics, "volagent_pool_size_bytes") == 10 * 2**30
    assert value(metrics, "volagent_pool_free_bytes") == 4 * 2**30


def test_used_bytes_per_volume_replace_the_whole_set(metrics: Metrics) -> None:
    a = "11111111-1111-1111-1111-111111111111"
    b = "22222222-2222-2222-2222-222222222222"
    metrics.set_volume_used({a: 100, b: 200})
    assert value(metrics, "volagent_volume_used_bytes", volume=a) == 100.0
    assert value(metrics, "volagent_volume_used_bytes", volume=b) == 200.0
    metrics.set_volume_used({b: 300})
    assert label_values(metrics, "volagent_volume_used_bytes", "volume") == {b}
    assert value(metrics, "volagent_volume_used_bytes", volume=b) == 300.0
    metrics.set_volume_used({})
    assert label_values(metrics, "volagent_volume_used_bytes", "volume") == set()


def test_outbox_and_central_errors(metrics: Metrics) -> None:
    metrics.set_outbox(12, 3.5)
    assert value(metrics, "volagent_outbox_depth") == 12.0
    assert value(metrics, "volagent_outbox_oldest_age_seconds") == 3.5
    metrics.set_outbox(0, 0.0)
    assert value(metrics, "volagent_outbox_depth") == 0.0
    metrics.central_error("put_volume", "500")
    metrics.central_error("put_volume", "500")
    metrics.central_error("heartbeat", "timeout")
    errors = "volagent_central_errors_total"
    assert value(metrics, errors, operation="put_volume", code="500") == 2.0
    assert value(metrics, errors, operation="heartbeat", code="timeout") == 1.0
