"""Replica-owned work at shutdown, without Ray: ``cineweave up`` waits for the replicas' generations
(bounded) before it takes its own Ray down, and the wire events tolerate a newer replica."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api.core.events import DoneEvent, OutputEvent, event_from_dict, event_to_wire
from api.settings import Settings
from ops.stack import EmbeddedStack
from serve.executor import TRAINER_KEY


class Answer:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout_s: float | None = None) -> Any:
        return self.value


class StatsHandle:
    """A deployment handle whose ``stats()`` reports the given job states, one answer per call."""

    def __init__(self, answers: list[dict[str, str]]) -> None:
        self.answers = answers
        self.calls = 0

    @property
    def stats(self) -> StatsHandle:
        return self

    def remote(self) -> Answer:
        self.calls += 1
        states = self.answers.pop(0) if self.answers else {}
        return Answer({"jobs": {job: {"state": state} for job, state in states.items()}})


def stack(tmp_path: Path) -> EmbeddedStack:
    return EmbeddedStack(Settings(data_dir=tmp_path, _env_file=None), models=[])


def test_drain_waits_until_no_replica_runs_a_generation(tmp_path: Path) -> None:
    s = stack(tmp_path)
    sd = StatsHandle([{"a": "running", "b": "queued", "c": "succeeded"}, {"a": "running"}, {"a": "succeeded"}])
    s.handles = {"tiny-sd": sd, TRAINER_KEY: object()}  # the trainer is not asked
    assert s.active_runs() == {"tiny-sd": 2}
    assert s.drain(timeout_s=10, poll_s=0.01) is True
    assert sd.calls == 3


def test_drain_is_bounded(tmp_path: Path) -> None:
    s = stack(tmp_path)
    s.handles = {"tiny-sd": StatsHandle([{"a": "running"}] * 10_000)}
    assert s.drain(timeout_s=0.05, poll_s=0.01) is False


def test_wire_events_from_a_newer_replica_are_read_without_error() -> None:
    wire = event_to_wire(OutputEvent(key="k", content_type="image/png"))
    assert wire["v"] == 1
    assert event_from_dict({**wire, "v": 2, "sha256": "ab"}) == OutputEvent(key="k", content_type="image/png")
    assert event_from_dict({"type": "done", "result": {"seed": 1}, "billing": {}}) == DoneEvent({"seed": 1})
    assert event_from_dict({"type": "heartbeat", "v": 2}) is None
