"""The serving behaviours on the real Ray path: batching, cancel, a replica lost mid-job, a
checkpoint swap under load. Over the HTTP API of the shared stack (``ray_api``), asserting from
the replica itself (``stats``) and from the ledger and storage.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import ray

from tests.fixtures.harness import ADMIN_KEY, bearer
from tests.fixtures.ray import RayApi

pytestmark = pytest.mark.ray

# A small request; a test that needs it running at a given moment holds it with the step hook
# (``ray_api.hold``: serve.testhooks), never with a large step count and a sleep.
SMALL = {"width": 64, "height": 64, "steps": 4, "seed": 99}


def held(token: str, **inputs: Any) -> dict[str, Any]:
    """A small request whose prompt carries a hold token."""
    return {**SMALL, "prompt": f"held {token}", **inputs}


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def replica_names(model: str) -> list[str]:
    """Names of the live Serve replica actors of a model's app (``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    prefix = f"SERVE_REPLICA::{model}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def test_eight_concurrent_requests_run_batched(ray_api: RayApi) -> None:
    users = [ray_api.user() for _ in range(2)]
    before = ray_api.stats("tiny-sd")["batch_sizes"]

    def submit(i: int) -> tuple[str, str]:
        key = users[i % 2].api_key
        job = ray_api.submit(key, "tiny-sd", {"prompt": f"picture {i}", "width": 64, "height": 64, "steps": 4,
                                              "seed": 100 + i})
        return key, job["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        submitted = list(pool.map(submit, range(8)))
    jobs = [ray_api.wait(key, job_id, timeout_s=90) for key, job_id in submitted]
    assert [j["status"] for j in jobs] == ["succeeded"] * 8, [(j["id"], j["status"], j["error"]) for j in jobs]
    assert len({j["outputs"][0]["url"] for j in jobs}) == 8
    assert all(j["result"]["seed"] == j["input"]["seed"] for j in jobs)
    sizes = ray_api.stats("tiny-sd")["batch_sizes"][len(before):]
    assert sum(sizes) == 8, sizes  # every request ran once, and only these ran
    assert max(sizes) > 1, f"no batch larger than one ran: {sizes}"


def test_requests_arriving_during_a_batch_run_together_next(ray_api: RayApi) -> None:
    """Requests that reach the replica while it generates wait and then run as ONE batch, however
    their arrivals were spread (Ray's @serve.batch split them by arrival time into batches of one)."""
    user = ray_api.user()
    before = len(ray_api.stats("tiny-sd")["batch_sizes"])
    token = ray_api.hold(step=1)
    slow = ray_api.submit(user.api_key, "tiny-sd", held(token))
    ray_api.wait_held(slow["id"])  # its batch (of one) is running, held after step 1
    later = [ray_api.submit(user.api_key, "tiny-sd", {"prompt": f"later {i}", "steps": 3, "seed": i})["id"]
             for i in range(6)]
    ray_api.wait_stats("tiny-sd", lambda s: s["queued"] == 6)  # all six wait on the replica
    assert ray_api.job(user.api_key, slow["id"])["status"] == "running"
    ray_api.release(slow["id"])
    jobs = [ray_api.wait(user.api_key, job_id, timeout_s=90) for job_id in [slow["id"], *later]]
    assert [j["status"] for j in jobs] == ["succeeded"] * 7, [(j["status"], j["error"]) for j in jobs]
    assert ray_api.stats("tiny-sd")["batch_sizes"][before:] == [1, 6]


def test_cancel_mid_run(ray_api: RayApi) -> None:
    user = ray_api.user(credits=50)
    start_balance = ray_api.credits(user.api_key)["balance"]
    token = ray_api.hold(step=2)
    job = ray_api.submit(user.api_key, "tiny-sd", held(token, steps=10))
    assert ray_api.credits(user.api_key)["reserved"] == job["credits"]["reserved"] > 0
    assert ray_api.wait_held(job["id"]) == 2
    running = ray_api.wait(user.api_key, job["id"], statuses={"running"})
    assert running["status"] == "running"
    with ray_api.http(user.api_key) as client:
        response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    done = ray_api.wait(user.api_key, job["id"], timeout_s=30)  # never released: the cancel ends the hold
    assert done["status"] == "canceled", done
    # The replica stopped the pipeline early (held after 2 of 10+ steps): it recorded the cancel,
    # ran the job once, and the job never got near the end.
    stats = ray_api.stats("tiny-sd")
    assert job["id"] in stats["canceled"] and stats["runs_by_job"][job["id"]] == 1
    assert done["progress"] < 0.5, done["progress"]
    # Refunded in full, exactly once; nothing charged; no output kept.
    assert done["credits"]["charged"] == 0 and done["credits"]["refunded"] == done["credits"]["reserved"]
    kinds = [e.kind for e in ray_api.ledger(user.user.id, job["id"])]
    assert kinds == ["reserve", "refund"], kinds
    credits = ray_api.credits(user.api_key)
    assert credits["balance"] == start_balance and credits["reserved"] == 0
    assert done["outputs"] == [] and ray_api.output_keys(user.user.id, job["id"]) == []
    # The replica is free again: a new job on it succeeds.
    ray_api.run(user.api_key, "tiny-sd", {"prompt": "after cancel", "steps": 2, "seed": 1})


@pytest.mark.slow
def test_replica_killed_mid_job_is_retried_and_charged_once(ray_api: RayApi) -> None:
    user = ray_api.user(credits=50)
    start_balance = ray_api.credits(user.api_key)["balance"]
    before = replica_names("tiny-sd")
    assert len(before) == 1, before
    token = ray_api.hold(step=1)
    job = ray_api.submit(user.api_key, "tiny-sd", held(token))
    ray_api.wait_held(job["id"])
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    ray_api.release(job["id"])  # the retry on the new replica is not held again
    done = ray_api.wait(user.api_key, job["id"], timeout_s=150)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    after = replica_names("tiny-sd")
    assert after and before[0] not in after, "Serve replaced the killed replica"
    # Charged once, never refunded; the output of the second attempt is there.
    assert done["credits"]["charged"] == done["credits"]["reserved"] and done["credits"]["refunded"] == 0
    kinds = [e.kind for e in ray_api.ledger(user.user.id, job["id"])]
    assert kinds == ["reserve", "capture"], kinds
    assert ray_api.credits(user.api_key)["balance"] == start_balance - done["credits"]["charged"]
    assert len(ray_api.output_keys(user.user.id, job["id"])) == 2
    with ray_api.http(user.api_key) as client:
        events = client.get(f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}).text
    assert "retrying" in events, "the first attempt's failure was recorded as a retry"


@pytest.mark.slow
def test_checkpoint_swap_under_steady_load(ray_api: RayApi, tmp_path: Path) -> None:
    original = ray_api.stats("tiny-sd")
    replicas = replica_names("tiny-sd")
    copy = tmp_path / "tiny-sd-copy"
    shutil.copytree(ray_api.settings.tiny_models_dir / "tiny-sd", copy)
    user = ray_api.user(credits=1000)
    submitted: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:  # a steady stream of small jobs (5/s), bounded in time and count (< the active-job limit)
        deadline = time.monotonic() + 30
        with ray_api.http(user.api_key) as client:
            while not stop.is_set() and time.monotonic() < deadline and len(submitted) < 60:
                response = client.post("/v1/jobs", json={"model": "tiny-sd", "input": {
                    "prompt": f"load {len(submitted)}", "width": 64, "height": 64, "steps": 2}})
                if response.status_code != 202:
                    errors.append(response.text)
                else:
                    submitted.append((time.monotonic(), response.json()["id"]))
                time.sleep(0.2)

    loader = threading.Thread(target=load, name="swap-load")
    loader.start()
    try:
        time.sleep(1.5)
        swap_started, wall_started = time.monotonic(), datetime.now(UTC)
        with ray_api.http(ADMIN_KEY, timeout_s=120) as admin:
            response = admin.post("/v1/admin/models/tiny-sd/swap", json={"source": {"path": str(copy)}})
        swap_ended, wall_ended = time.monotonic(), datetime.now(UTC)
        assert response.status_code == 200, response.text
        time.sleep(1.5)
    finally:
        stop.set()
        loader.join(timeout=40)
    try:
        assert not loader.is_alive() and not errors, errors
        jobs = [ray_api.wait(user.api_key, job_id, timeout_s=120) for _, job_id in submitted]
        failed = [(j["id"], j["status"], j["error"]) for j in jobs if j["status"] != "succeeded"]
        assert not failed, f"{len(failed)} of {len(jobs)} requests failed during the swap: {failed}"
        assert any(t < swap_started for t, _ in submitted) and any(t > swap_ended for t, _ in submitted)
        assert len(jobs) >= 8
        during = [j for j in jobs if parse_time(j["started_at"]) < wall_ended and parse_time(j["completed_at"]) > wall_started]
        assert during, "no job ran while the swap was in progress"
        stats = ray_api.stats("tiny-sd")
        assert stats["source"] == {"path": str(copy)}
        assert stats["swaps"] == original["swaps"] + 1
        assert replica_names("tiny-sd") == replicas, "swapped in place: the replica was not restarted"
        with ray_api.http(ADMIN_KEY) as admin:
            listed = admin.get("/v1/models").json()
        assert listed  # the API kept answering
    finally:  # back to the shipped checkpoint for the other tests (in place, about a second)
        with ray_api.http(ADMIN_KEY, timeout_s=120) as admin:
            back = admin.post("/v1/admin/models/tiny-sd/swap", json={"source": {"tiny": "tiny-sd"}})
    assert back.status_code == 200, back.text
    assert ray_api.stats("tiny-sd")["source"] == {"tiny": "tiny-sd"}
    assert ray_api.stack.catalog.get("tiny-sd").source.tiny == "tiny-sd"


def test_swap_needs_an_admin_and_a_deployed_model(ray_api: RayApi) -> None:
    with ray_api.http(ADMIN_KEY) as admin:
        response = admin.post("/v1/admin/models/no-such-model/swap", json={"source": {"tiny": "tiny-sd"}})
    assert response.status_code == 404, response.text
    with ray_api.http() as client:
        response = client.post("/v1/admin/models/tiny-sd/swap", json={"source": {"tiny": "tiny-sd"}},
                               headers=bearer(ray_api.user().api_key))
    assert response.status_code == 403, response.text


def test_a_caller_that_goes_away_leaves_the_run_to_the_jobs_next_attempt(ray_api: RayApi) -> None:
    """An API that stops mid-job drops its stream; the job's next attempt (same job id) attaches to
    the run on the replica and gets its result: the pipeline runs once. An explicit cancel, though,
    stops the run, and the attempt after it runs afresh."""
    handle = ray_api.stack.handles["tiny-sd"]
    streaming = handle.options(stream=True)
    token = ray_api.hold(step=1)
    job_id = f"job_direct_{uuid.uuid4().hex[:12]}"
    payload = {"v": 1, "job_id": job_id, "attempt": 1, "task": "t2i", "adapter_set": "",
               "input": held(token), "output_prefix": f"outputs/direct/{job_id}/"}
    first = streaming.generate.remote(payload)
    assert next(iter(first))["type"] == "stage"
    ray_api.wait_held(job_id)
    first.cancel()  # the caller goes away
    retry = streaming.generate.remote({**payload, "attempt": 2})
    ray_api.wait_stats("tiny-sd", lambda s: s["attaches"].get(job_id) == 1)
    ray_api.release(job_id)
    events = list(retry)
    assert events[-1]["type"] == "done", events[-3:]
    assert [e["type"] for e in events if e["type"] in ("output", "error")] == ["output"]
    stats = ray_api.stats("tiny-sd")
    assert stats["runs_by_job"][job_id] == 1 and job_id not in stats["canceled"]
    assert stats["jobs"][job_id]["attempts"] == [1, 2]
    assert ray_api.storage.exists(f"outputs/direct/{job_id}/result.json")

    other = f"job_direct_{uuid.uuid4().hex[:12]}"
    payload = {**payload, "job_id": other, "output_prefix": f"outputs/direct/{other}/"}
    first = streaming.generate.remote(payload)
    ray_api.wait_held(other)
    assert handle.cancel.remote(other).result(timeout_s=30) is True
    ended = list(first)
    assert ended[-1]["type"] == "error" and ended[-1]["code"] == "canceled", ended[-2:]
    ray_api.release(other)
    events = list(streaming.generate.remote({**payload, "attempt": 2}))
    assert events[-1]["type"] == "done", events[-3:]
    assert ray_api.stats("tiny-sd")["runs_by_job"][other] == 2


def test_a_stack_that_joined_a_running_ray_leaves_its_serve_running(ray_api: RayApi) -> None:
    """Stopping an API that joined someone else's Ray (a cluster, a RayService) must not take the
    models down for everyone else: only a stack that started Ray shuts Serve down."""
    from ray import serve

    from ops.stack import EmbeddedStack

    other = EmbeddedStack(ray_api.settings, models=["tiny-sd"])
    other.start_ray()
    assert not other._started_ray
    other.stop()
    assert ray.is_initialized()
    apps = serve.status().applications
    assert {"tiny-sd", "tiny-wan", "tiny-wan-i2v"} <= set(apps)
    assert apps["tiny-sd"].status == "RUNNING"
    ray_api.run(ray_api.user().api_key, "tiny-sd", {"prompt": "still here", "steps": 2, "seed": 3})


@pytest.mark.slow
def test_a_swap_to_a_checkpoint_that_does_not_load_keeps_the_old_one_serving(ray_api: RayApi, tmp_path: Path) -> None:
    from ray import serve

    from ops.serve_config import serve_details

    replicas = replica_names("tiny-sd")
    before = ray_api.stats("tiny-sd")
    # Missing weights: refused before anything changes.
    with ray_api.http(ADMIN_KEY, timeout_s=120) as admin:
        missing = admin.post("/v1/admin/models/tiny-sd/swap", json={"source": {"path": str(tmp_path / "nowhere")}})
    assert missing.status_code == 422, missing.text
    assert "nowhere" in missing.json()["error"]["message"]
    # Weights that look whole but do not load: the replica keeps its pipeline, the swap is reported failed.
    broken = tmp_path / "tiny-sd-broken"
    shutil.copytree(ray_api.settings.tiny_models_dir / "tiny-sd", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with ray_api.http(ADMIN_KEY, timeout_s=120) as admin:
        response = admin.post("/v1/admin/models/tiny-sd/swap", json={"source": {"path": str(broken)}})
    assert response.status_code == 422, response.text
    assert "could not load" in response.json()["error"]["message"]
    stats = ray_api.stats("tiny-sd")
    assert stats["source"] == before["source"] and stats["swaps"] == before["swaps"]
    assert stats["swap_error"]["source"] == {"path": str(broken)}
    assert replica_names("tiny-sd") == replicas, "the replica kept running"
    assert serve.status().applications["tiny-sd"].status == "RUNNING"
    live = serve.status().applications["tiny-sd"].deployments["gen-tiny-sd"]
    assert live.status == "HEALTHY"
    assert ray_api.stack.catalog.get("tiny-sd").source.model_dump(exclude_none=True) == before["source"]
    # The deployment's user_config is back on the served source, so a replica started later loads it.
    config = serve_details()["applications"]["tiny-sd"]["deployments"]["gen-tiny-sd"]["deployment_config"]
    assert config["user_config"] == {"source": before["source"]}
    ray_api.run(ray_api.user().api_key, "tiny-sd", {"prompt": "still the old weights", "steps": 2, "seed": 4})
