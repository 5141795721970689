"""The ETA counts a job of ``num_outputs`` n images as n times the work of one."""

from __future__ import annotations

import pytest

from api.core.queueing import seconds_per_unit, work_units


def test_work_units_multiply_by_num_outputs() -> None:
    one = {"steps": 4, "width": 64, "height": 64}
    assert work_units({**one, "num_outputs": 3}) == 3 * work_units(one)
    assert work_units({**one, "num_outputs": 1}) == work_units(one)


def test_the_rate_of_a_batch_of_outputs_is_per_image() -> None:
    # a run of 4 images in 8 s measures the same per-image rate as a run of 1 image in 2 s
    rate = seconds_per_unit([(8.0, {"steps": 10, "num_outputs": 4})])
    assert rate == pytest.approx(seconds_per_unit([(2.0, {"steps": 10})]))
