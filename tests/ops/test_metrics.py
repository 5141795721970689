"""/metrics after real jobs (the scripted executor, no Ray), the new series' plumbing, and the
alert rules and dashboard naming only series that exist."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from api.core.events import ErrorEvent
from api.db.tables import Job, utcnow
from api.metrics import Metrics, StageTimer
from api.runner.runner import Runner
from api.storage.local import LocalStorage
from ops.opscmd import ReplicaGpuMemory
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import ApiHarness, bearer, wait_job, wait_until

ROOT = Path(__file__).resolve().parents[2]
MakeApi = Callable[..., Awaitable[ApiHarness]]

snapshot_has_running_idle = pytest.mark.skipif(
    "running_idle" not in inspect.getsource(__import__("api.http.app", fromlist=["_db_snapshot"])._db_snapshot),
    reason="api/http/app.py's snapshot does not report running_idle yet (the diff in the ops report)")
runner_feeds_stages = pytest.mark.skipif(
    "stage_timer" not in inspect.getsource(Runner.drive),
    reason="api/runner/runner.py does not feed Metrics.stage_timer yet (the diff in the ops report)")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


async def run_jobs(make_api: MakeApi, storage: LocalStorage) -> tuple[ApiHarness, str, list[str]]:
    """Three image jobs that succeed and one that fails, then one job queued that no runner may take."""
    failing = {"boom": [ErrorEvent("invalid_input", "the pipeline refused it", retryable=False)]}
    h = await make_api(FakeExecutor(storage=storage, failures=failing), max_active_jobs=10,
                       rate_limit_per_minute=100)
    user = h.user(credits=100)
    ids = []
    for prompt in ("a cat", "a dog", "a fox", "boom"):
        response = await h.submit(user.api_key, input={"prompt": prompt, "width": 64, "height": 64})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    for job_id in ids:
        await wait_job(h.db, job_id, timeout_s=20)
    with h.db.session() as session:
        session.add(Job(user_id=user.user.id, model="tiny-wan", kind="video", task="t2v", status="queued",
                        created_at=utcnow() - timedelta(seconds=120),
                        next_attempt_at=utcnow() + timedelta(hours=1)))  # not claimable during the test
        session.commit()
    return h, user.api_key, ids


async def test_metrics_after_jobs_have_job_queue_and_latency_series(make_api: MakeApi, storage: LocalStorage) -> None:
    h, key, _ = await run_jobs(make_api, storage)
    await asyncio.to_thread(h.state.metrics.refresh)
    response = await h.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    scraped = samples(response.text)

    # jobs by status and model (from the database)
    assert value(scraped, "cineweave_jobs", status="succeeded", model="tiny-sd") == 3
    assert value(scraped, "cineweave_jobs", status="failed", model="tiny-sd") == 1
    assert value(scraped, "cineweave_jobs", status="queued", model="tiny-wan") == 1
    # queue depth and wait per model
    assert value(scraped, "cineweave_queue_depth", model="tiny-wan") == 1
    assert value(scraped, "cineweave_queue_depth", model="tiny-sd") is None
    wait = value(scraped, "cineweave_queue_oldest_wait_seconds", model="tiny-wan")
    assert wait is not None and 119 <= wait < 600
    assert value(scraped, "cineweave_job_queue_seconds_count", model="tiny-sd") == 4
    # counters
    assert value(scraped, "cineweave_jobs_submitted_total", model="tiny-sd", kind="image") == 4
    assert value(scraped, "cineweave_jobs_finished_total", model="tiny-sd", status="succeeded") == 3
    assert value(scraped, "cineweave_jobs_finished_total", model="tiny-sd", status="failed") == 1
    # latency histograms by model (and status): counts and a consistent +Inf bucket
    assert value(scraped, "cineweave_job_run_seconds_count", model="tiny-sd", status="succeeded") == 3
    assert value(scraped, "cineweave_job_run_seconds_bucket", model="tiny-sd", status="succeeded", le="+Inf") == 3
    assert value(scraped, "cineweave_job_run_seconds_count", model="tiny-sd", status="failed") == 1
    run_sum = value(scraped, "cineweave_job_run_seconds_sum", model="tiny-sd", status="succeeded")
    assert run_sum is not None and 0 <= run_sum < 30
    # credits: 4 reserved at the image price, 3 captured, 1 refunded
    price = (await h.client.get("/v1/jobs?limit=50", headers=bearer(key))).json()["data"][0]["credits"]["reserved"]
    assert value(scraped, "cineweave_credits_moved_total", kind="reserve") == 4 * price
    assert value(scraped, "cineweave_credits_moved_total", kind="capture") == 3 * price
    assert value(scraped, "cineweave_credits_moved_total", kind="refund") == price
    # the new families are exported (empty until fed)
    names = {name for name, _ in scraped} | {f.name for f in text_string_to_metric_families(response.text)}
    assert "cineweave_running_job_idle_seconds" in names


@runner_feeds_stages
async def test_stage_latency_series_after_jobs(make_api: MakeApi, storage: LocalStorage) -> None:
    h, _, _ = await run_jobs(make_api, storage)
    await asyncio.to_thread(h.state.metrics.refresh)
    scraped = samples((await h.client.get("/metrics")).text)
    for stage in ("starting", "generating"):
        count = value(scraped, "cineweave_job_stage_seconds_count", model="tiny-sd", stage=stage)
        assert count == 4, (stage, count)  # every run passed through both stages once


@snapshot_has_running_idle
async def test_running_idle_series_shows_a_stuck_job(make_api: MakeApi, storage: LocalStorage) -> None:
    h = await make_api()
    user = h.user(credits=10)
    with h.db.session() as session:  # another runner's job: leased for an hour, silent for 20 minutes
        session.add(Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i", status="running",
                        lease_owner="elsewhere", lease_expires_at=utcnow() + timedelta(hours=1),
                        updated_at=utcnow() - timedelta(minutes=20)))
        session.commit()
    await asyncio.to_thread(h.state.metrics.refresh)
    scraped = samples((await h.client.get("/metrics")).text)
    idle = value(scraped, "cineweave_running_job_idle_seconds", model="tiny-sd")
    assert idle is not None and 1200 <= idle < 1300
    assert value(scraped, "cineweave_jobs", status="running", model="tiny-sd") == 1


def test_stage_timer_observes_each_stage_once() -> None:
    metrics = Metrics()
    now = [100.0]
    timer = StageTimer(metrics.stage_seconds, "tiny-sd", clock=lambda: now[0])
    now[0] += 0.5
    timer.enter("generating")
    timer.enter("generating")  # no change: nothing observed
    now[0] += 2.0
    timer.enter("encoding")
    now[0] += 0.25
    timer.close()
    timer.close()  # idempotent
    metrics.refresh()  # the slow gauges are cached; the app refreshes them in the background
    scraped = samples(metrics.render().decode())
    for stage, seconds in (("starting", 0.5), ("generating", 2.0), ("encoding", 0.25)):
        assert value(scraped, "cineweave_job_stage_seconds_count", model="tiny-sd", stage=stage) == 1
        assert value(scraped, "cineweave_job_stage_seconds_sum", model="tiny-sd", stage=stage) == pytest.approx(seconds)
    assert timer.stage is None
    assert metrics.stage_timer("m").stage == "starting"


def test_db_collector_exports_running_idle_when_the_snapshot_has_it() -> None:
    metrics = Metrics(snapshot=lambda: {"jobs": {("running", "sdxl"): 2}, "running_idle": {"sdxl": 950.0}})
    metrics.refresh()  # the slow gauges are cached; the app refreshes them in the background
    scraped = samples(metrics.render().decode())
    assert value(scraped, "cineweave_running_job_idle_seconds", model="sdxl") == 950.0
    assert value(scraped, "cineweave_jobs", status="running", model="sdxl") == 2


def test_gpu_memory_gauge_from_a_source_survives_its_failures() -> None:
    metrics = Metrics()
    metrics.watch_gpu_memory(lambda: {"sdxl": {"r1": 12e9, "r2": 11e9}, "flux-schnell": {"r9": 3.5e10}})
    metrics.refresh()  # the slow gauges are cached; the app refreshes them in the background
    scraped = samples(metrics.render().decode())
    assert value(scraped, "cineweave_replica_gpu_memory_bytes", model="sdxl", replica="r2") == 11e9
    assert value(scraped, "cineweave_replica_gpu_memory_bytes", model="flux-schnell", replica="r9") == 3.5e10

    def broken() -> dict[str, dict[str, float]]:
        raise RuntimeError("cluster restarting")

    metrics.watch_gpu_memory(broken)  # replaces the first source
    metrics.refresh()  # the slow gauges are cached; the app refreshes them in the background
    text = metrics.render().decode()
    assert "cineweave_replica_gpu_memory_bytes{" not in text
    assert "cineweave_jobs_submitted_total" in text  # the rest of the scrape is intact


class FakeResponse:
    def __init__(self, stats: dict[str, Any] | Exception) -> None:
        self._stats = stats

    def result(self, timeout_s: float) -> dict[str, Any]:
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


class FakeHandle:
    """Answers ``stats`` calls from a script, round robin, like a handle over a few replicas."""

    def __init__(self, replies: list[dict[str, Any] | Exception]) -> None:
        self.replies, self.calls = replies, 0
        self.stats = self

    def remote(self) -> FakeResponse:
        reply = self.replies[self.calls % len(self.replies)]
        self.calls += 1
        return FakeResponse(reply)


def test_replica_gpu_memory_sampler_merges_replicas_caches_and_forgets() -> None:
    now = [0.0]
    handles: dict[str, Any] = {
        "sdxl": FakeHandle([{"replica": "a", "gpu_memory_bytes": 10.0}, {"replica": "b", "gpu_memory_bytes": 20.0},
                            TimeoutError("busy")]),
        "tiny-sd": FakeHandle([{"replica": "c", "gpu_memory_bytes": None}]),  # no CUDA: nothing
    }
    sampler = ReplicaGpuMemory(lambda: handles, calls_per_model=4, ttl_s=10, keep_s=60, clock=lambda: now[0])
    assert sampler() == {"sdxl": {"a": 10.0, "b": 20.0}}
    assert handles["sdxl"].calls == 4
    now[0] = 5
    sampler()
    assert handles["sdxl"].calls == 4  # cached within the ttl
    handles["sdxl"] = FakeHandle([{"replica": "a", "gpu_memory_bytes": 15.0}])
    now[0] = 30
    assert sampler() == {"sdxl": {"a": 15.0, "b": 20.0}}  # b kept: busy, not gone
    now[0] = 100
    assert sampler() == {"sdxl": {"a": 15.0}}  # b not heard of for longer than keep_s


# --- alert rules and dashboard -------------------------------------------------------------------

def exported() -> dict[str, set[str]]:
    """Every cineweave series name the app exports, with its label names."""
    metrics = Metrics(snapshot=lambda: {"jobs": {("queued", "m"): 1}, "queued": {"m": 1}, "oldest_wait": {"m": 1.0},
                                        "running_idle": {"m": 1.0}})
    metrics.watch_gpu_memory(lambda: {"m": {"r": 1.0}})
    metrics.submitted.labels("m", "image").inc()
    metrics.rejected.labels("rate_limited").inc()
    metrics.finished_total.labels("m", "failed").inc()
    metrics.run_seconds.labels("m", "failed").observe(1)
    metrics.queue_seconds.labels("m").observe(1)
    metrics.stage_seconds.labels("m", "generating").observe(1)
    metrics.overflow.labels("replicate", "wait").inc()
    metrics.overflow_cost.labels("replicate").inc(1)
    metrics.credits.labels("reserve").inc()
    metrics.webhooks.labels("delivered").inc()
    out: dict[str, set[str]] = {}
    metrics.refresh()  # the slow gauges are cached; the app refreshes them in the background
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    out = [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    import json

    dashboard = json.loads((ROOT / "ops" / "grafana" / "cineweave-dashboard.json").read_text())
    out += [(f"panel {p['title']}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    return out


def test_alerts_and_dashboard_use_only_exported_series_and_labels() -> None:
    series = exported()
    checked = 0
    for where, expr in expressions():
        names = set(re.findall(r"\bcineweave_[a-z_]+", expr))
        for name in names:
            assert name in series, f"{where}: {name} is not exported"
        labels = set().union(*(series[n] for n in names)) if names else set()
        for clause in re.findall(r"\bby \(([^)]*)\)", expr):
            for label in (x.strip() for x in clause.split(",")):
                if names and not expr.count("ray_"):
                    assert label in labels, f"{where}: grouping by {label!r}, which {sorted(names)} lack"
        for label in re.findall(r"(\w+)=~?\"", expr):
            if names and not expr.count("ray_"):
                assert label in labels, f"{where}: selecting on {label!r}, which {sorted(names)} lack"
        checked += bool(names)
    assert checked >= 25


def test_alert_rules_cover_what_the_issue_asks_for() -> None:
    rules = yaml.safe_load((ROOT / "ops" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    wanted = {"CineWeaveJobFailureRateHigh": "cineweave_jobs_finished_total",
              "CineWeaveQueueWaitHigh": "cineweave_queue_oldest_wait_seconds",
              "CineWeaveJobStuck": "cineweave_running_job_idle_seconds",
              "CineWeaveQueueNotDraining": "cineweave_queue_depth",
              "CineWeaveOverflowSpendHigh": "cineweave_overflow_cost_usd_total"}
    for name, series in wanted.items():
        assert series in alerts[name]["expr"], name
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    scrape = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    assert jobs["cineweave-api"]["metrics_path"] == "/metrics"
    assert jobs["cineweave-api"]["static_configs"][0]["targets"] == ["cineweave:8080"]


def test_dashboard_is_a_grafana_dashboard_without_overlapping_panels() -> None:
    import json

    dashboard = json.loads((ROOT / "ops" / "grafana" / "cineweave-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    boxes = [p["gridPos"] for p in panels]
    for i, a in enumerate(boxes):
        assert 0 <= a["x"] and a["x"] + a["w"] <= 24
        for b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, (a, b)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("queue", "failure", "stage", "overflow", "credits", "gpu memory per replica"):
        assert topic in titles, topic


# --- /metrics: token, and no slow call on the request path -------------------------------------

async def test_metrics_token_required_when_set(make_api: MakeApi) -> None:
    h = await make_api(run_runner=False, metrics_token="s3cret-scrape")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-scrape"}):
        r = await h.client.get("/metrics", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized" and "message" in r.json()["error"]
    r = await h.client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"})
    assert r.status_code == 200 and "cineweave_jobs_submitted_total" in r.text


async def test_metrics_open_without_a_token(make_api: MakeApi) -> None:
    h = await make_api(run_runner=False)
    assert (await h.client.get("/metrics")).status_code == 200


async def test_scrapes_never_call_the_cluster_or_the_database(make_api: MakeApi,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU source (Ray handle calls in production) and the DB snapshot run only on the
    refresher thread; any number of scrapes reads their cached values."""
    import threading

    import api.http.app as app_module

    calls: list[tuple[str, str]] = []

    def fake_snapshot(_db: Any) -> Callable[[], dict[str, Any]]:
        def snapshot() -> dict[str, Any]:
            calls.append(("database", threading.current_thread().name))
            return {"jobs": {("queued", "tiny-sd"): 7}, "queued": {"tiny-sd": 7}}
        return snapshot

    def gpu_source() -> dict[str, dict[str, float]]:
        calls.append(("gpu", threading.current_thread().name))
        return {"sdxl": {"r1": 5e9}}

    monkeypatch.setattr(app_module, "_db_snapshot", fake_snapshot)
    h = await make_api(run_runner=False, metrics_refresh_s=300)  # one refresh at start, then none
    await wait_until(lambda: ("database", "metrics-refresh") in calls, 10, what="the refresher's first pass")
    h.state.metrics.watch_gpu_memory(gpu_source)
    await asyncio.to_thread(h.state.metrics.refresh)  # what the refresher does (an explicit hook)
    before = len(calls)
    for _ in range(5):
        scraped = samples((await h.client.get("/metrics")).text)
    assert len(calls) == before  # no scrape called a source
    assert value(scraped, "cineweave_queue_depth", model="tiny-sd") == 7
    assert value(scraped, "cineweave_replica_gpu_memory_bytes", model="sdxl", replica="r1") == 5e9
