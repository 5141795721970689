"""The replicas' test hook (``serve.testhooks``): one hold step or several, each held until its own
release (a release is consumed when its hold returns, so the next hold blocks again), ``.held``
naming the step held at. The holds run on a thread here; every wait is bounded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from serve.testhooks import Hold, StepHooks, parse_steps
from tests.fixtures.harness import wait_for

WAIT_S = 30.0


@pytest.mark.parametrize(("text", "steps"), [("2", (2,)), ("2 5", (2, 5)), ("5,2", (2, 5)),
                                             (" 3 ,\n7 ", (3, 7)), ("", (1,)), ("4 4", (4,))])
def test_a_hold_file_names_one_step_or_several(text: str, steps: tuple[int, ...]) -> None:
    assert parse_steps(text) == steps


@pytest.mark.parametrize("text", ["two", "0", "2 x", "-1"])
def test_a_hold_file_that_is_not_step_numbers_holds_nothing(tmp_path: Path, text: str) -> None:
    (tmp_path / "hold-abcdefgh.hold").write_text(text)
    assert StepHooks(tmp_path).hold_for("a cat hold-abcdefgh") is None


def test_hold_for_matches_the_token_in_the_prompt(tmp_path: Path) -> None:
    (tmp_path / "hold-abcdefgh.hold").write_text("2 5")
    hooks = StepHooks(tmp_path)
    assert hooks.hold_for("a cat hold-abcdefgh at dusk") == Hold("hold-abcdefgh", (2, 5))
    assert hooks.hold_for("a cat") is None


def test_each_hold_waits_for_its_own_release(tmp_path: Path) -> None:
    hooks = StepHooks(tmp_path, max_wait_s=WAIT_S)
    passed: list[int] = []

    def run() -> None:  # as the pipeline thread: held at 2 and at 5
        for step in (2, 5):
            hooks.hold("job_1", "hold-abcdefgh", step, lambda: False)
            passed.append(step)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    held = tmp_path / "job_1.held"
    release = tmp_path / "job_1.release"
    wait_for(lambda: held.exists() and held.read_text() == "2", "the hold at 2", WAIT_S)
    assert passed == []
    release.write_text("")
    # the release was consumed when the hold at 2 returned: the hold at 5 blocks until a new one
    wait_for(lambda: held.read_text() == "5", "the hold at 5", WAIT_S)
    assert passed == [2]
    assert not release.exists()
    release.write_text("")
    thread.join(WAIT_S)
    assert passed == [2, 5] and not thread.is_alive()
    assert not release.exists()


def test_a_token_release_lets_every_hold_pass(tmp_path: Path) -> None:
    hooks = StepHooks(tmp_path, max_wait_s=WAIT_S)
    (tmp_path / "hold-abcdefgh.release").write_text("")
    for step in (2, 5):  # returns at once, both times
        hooks.hold("job_2", "hold-abcdefgh", step, lambda: False)
    assert (tmp_path / "job_2.held").read_text() == "5"


def test_a_canceled_job_goes_on(tmp_path: Path) -> None:
    StepHooks(tmp_path, max_wait_s=WAIT_S).hold("job_3", "hold-abcdefgh", 1, lambda: True)
    assert (tmp_path / "job_3.held").read_text() == "1"
