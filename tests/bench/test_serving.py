"""bench/serving.py without running it: the mixed plan and the report's table (targets, load)."""

from __future__ import annotations

from typing import Any

from bench.serving import mixed_requests, table


def test_mixed_plan_interleaves_both_sizes_and_three_step_counts() -> None:
    plan = mixed_requests(16, 4)
    assert len(plan) == 16
    assert {p["width"] for p in plan} == {64, 96} and all(p["width"] == p["height"] for p in plan)
    assert {p["steps"] for p in plan} == {4, 6, 8}
    assert {(p["width"], p["steps"]) for p in plan} == {(w, s) for w in (64, 96) for s in (4, 6, 8)}


def _report(ratio: float, queue_ms: float, throughput: float) -> dict[str, Any]:
    ms = {"median_ms": 300.0}
    return {"model": "tiny-sd", "size": "64x64", "inference_steps": 4, "stack": {"runner_poll_s": 5.0},
            "overhead": {"raw_call": ms, "http_path": {"median_ms": 300.0 * ratio}, "ratio": ratio, "added_ms": 1.0,
                         "job_queue_s": {"median_ms": queue_ms}, "job_run_s": ms},
            "throughput": {"requests": 16, "raw_rps": 3.0, "stack_rps": 3.0 * throughput, "ratio": throughput,
                           "replica_batch_sizes": [8, 8], "replica_pipeline_s": 4.5, "replica_idle_between_s": 0.25},
            "mixed": {"requests": 16, "raw_sequential_s": [5.0], "stack_concurrent_s": [4.0], "ratio": 1.25,
                      "replica_batch_sizes": [4, 4, 8]},
            "targets": {"overhead_ratio_max": 1.10, "queue_median_ms_max": 20.0, "throughput_ratio_min": 1.0},
            "machine": {"load_average_before": [0.1, 0.2, 0.3], "load_average_after": [0.4, 0.5, 0.6]}}


def _text(report: dict[str, Any]) -> str:
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(table(report))
    return console.export_text()


def test_table_says_which_targets_are_met_and_shows_the_mixed_batches_and_load() -> None:
    met = _text(_report(1.05, 3.0, 1.2))
    assert "overhead ≤ 1.10×: met" in met and "queue median < 20 ms: met" in met and "throughput ≥ 1.0×: met" in met
    assert "4,4,8" in met and "[0.4, 0.5, 0.6]" in met
    assert "4.50 s / 0.25 s" in met  # the replica's pipeline time and its idle time between batches
    missed = _text(_report(1.5, 30.0, 0.8))
    assert missed.count("NOT met") == 3


def test_preview_cost_measures_both_ways_and_the_table_shows_it(tmp_path: Any) -> None:
    from bench.serving import preview_cost
    from models.tiny import make_tiny

    make_tiny(tmp_path, ["tiny-sd"])
    report = preview_cost(tmp_path, 64, 4, repeats=2, threads=1)
    assert report["pairs"] == 2 and report["every_k_steps"] == 2 and report["decoder"] == "projection"
    assert report["step_without"]["n"] == report["step_with"]["n"] == 2
    assert report["previews_sent"] == 2 and report["previews_per_run"] == 1  # step 2 of 4 (never the last)
    assert report["step_ratio"] > 0 and report["capture_ms"]["n"] == 2
    text = _text({**_report(1.05, 3.0, 1.2), "previews": report})
    assert "(d) step time, previews every 2 steps" in text and "cost ≤ 5 %" in text


def test_replica_time_sums_the_pipeline_calls_and_the_idle_gaps() -> None:
    from bench.serving import replica_time

    batches = [{"size": 3, "pipeline_s": 1.0}, {"size": 8, "pipeline_s": 2.0, "idle_before_s": 0.5},
               {"size": 5}]  # an older replica without timings counts nothing
    assert replica_time(batches, 4.0) == {"replica_pipeline_s": 3.0, "replica_idle_between_s": 0.5,
                                          "replica_busy_share": 0.75}


def test_the_idle_time_before_a_round_is_not_counted() -> None:
    from bench.serving import first_of_round

    batches = [{"size": 2, "pipeline_s": 0.5, "idle_before_s": 9.0}, {"size": 8, "pipeline_s": 2.0, "idle_before_s": 0.1}]
    assert first_of_round(batches) == [{"size": 2, "pipeline_s": 0.5}, {"size": 8, "pipeline_s": 2.0, "idle_before_s": 0.1}]


def test_round_edges_are_the_replica_idle_time_before_its_first_call_and_after_its_last() -> None:
    from bench.serving import edge_medians, round_edges

    batches = [{"size": 3, "started_at": 100.25, "pipeline_s": 1.0},
               {"size": 8, "started_at": 101.25, "pipeline_s": 2.0, "idle_before_s": 0.0},
               {"size": 5}]  # an older replica's entry without timings is left out
    edges = round_edges(batches, started=100.0, ended=103.5)
    assert edges == {"lead_in_s": 0.25, "tail_s": 0.25}
    assert round_edges([{"size": 1}], 0.0, 1.0) is None
    assert edge_medians([edges, None, {"lead_in_s": 0.75, "tail_s": 0.5}]) == {"round_lead_in_ms": 500.0,
                                                                              "round_tail_ms": 375.0}


def test_image_costs_reads_the_replicas_solo_and_batched_averages_of_one_bucket() -> None:
    from bench.serving import image_costs

    buckets = {"t2i 96x96 steps=4 guidance=5.0": {"solo_image_s": 9.0, "batched_image_s": 9.0},
               "t2i 64x64 steps=4 guidance=5.0": {"solo_image_s": 0.2, "batched_image_s": 0.25},
               "t2i 64x64 steps=8 guidance=5.0": {"solo_image_s": 0.4}}
    assert image_costs(buckets, "64x64 steps=4 ") == {"bucket": "t2i 64x64 steps=4 guidance=5.0", "solo_ms": 200.0,
                                                      "batched_ms": 250.0, "batching_gain": 0.8,
                                                      "batch_wait_ms": None}
    buckets["t2i 64x64 steps=4 guidance=5.0"]["batch_wait_s"] = 0.0264
    assert image_costs(buckets, "64x64 steps=4 ")["batch_wait_ms"] == 26.4  # type: ignore[index]
    assert image_costs(buckets, "64x64 steps=8 ") is None  # not measured both ways
