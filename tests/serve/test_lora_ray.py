"""Personal LoRAs over the HTTP API into the real Ray Serve path (issue 4, "Show"), on tiny-sd.

Train over ``POST /v1/loras`` on the trainer deployment, fetch the weights and load them into a fresh
diffusers pipeline, generate with and without the adapter, refuse bad uses, multiplex two users'
adapters on the one tiny-sd replica, and resume a training run after its replica is killed.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.ray import RayApi

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRAIN = {"base_model": "tiny-sd", "steps": 6, "resolution": 64, "rank": 4, "seed": 5, "trigger_word": "sks"}
GEN = {"prompt": "a photo of sks", "width": 64, "height": 64, "steps": 3, "seed": 4242}
COLORS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (240, 220, 20)]


def png_bytes(color: tuple[int, int, int], size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), color)
    # a little structure so the images are not flat
    for x in range(0, size, 8):
        for y in range(0, size, 8):
            if (x + y) % 16 == 0:
                img.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def upload_images(api: RayApi, key: str, colors: list[tuple[int, int, int]]) -> list[str]:
    ids = []
    with api.http(key) as client:
        for i, color in enumerate(colors):
            r = client.post("/v1/uploads", files={"file": (f"img{i}.png", png_bytes(color), "image/png")})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
    return ids


def start_training(api: RayApi, key: str, name: str, colors: list[tuple[int, int, int]],
                   **overrides: Any) -> dict[str, Any]:
    images = upload_images(api, key, colors)
    with api.http(key) as client:
        r = client.post("/v1/loras", json={"name": name, "images": images, **TRAIN, **overrides})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["job"]["kind"] == "training"
    return body


def train(api: RayApi, key: str, name: str, colors: list[tuple[int, int, int]], timeout_s: float = 120.0,
          **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train a LoRA to the end; return (the LoRA view, its finished job)."""
    body = start_training(api, key, name, colors, **overrides)
    job = api.wait(key, body["job"]["id"], timeout_s=timeout_s)
    assert job["status"] == "succeeded", job
    with api.http(key) as client:
        r = client.get(f"/v1/loras/{body['id']}")
    assert r.status_code == 200, r.text
    return r.json(), job


def pixels(api: RayApi, job: dict[str, Any]) -> np.ndarray:
    img = Image.open(io.BytesIO(api.download(job["outputs"][0]["url"])))
    img.load()
    return np.asarray(img.convert("RGB"))


def gen(api: RayApi, key: str, loras: list[dict[str, Any]] | None = None, **changes: Any) -> np.ndarray:
    inputs = {**GEN, **changes}
    if loras is not None:
        inputs["loras"] = loras
    return pixels(api, api.run(key, "tiny-sd", inputs, timeout_s=90))


def check_charged_once(api: RayApi, user_id: str, job: dict[str, Any]) -> None:
    assert job["credits"]["charged"] == job["credits"]["reserved"] > 0, job["credits"]
    assert job["credits"]["refunded"] == 0
    kinds = sorted(e.kind for e in api.ledger(user_id, job["id"]))
    assert kinds == ["capture", "reserve"], kinds


@pytest.fixture(scope="module")
def owner(ray_api: RayApi) -> Any:
    return ray_api.user(credits=1000)


@pytest.fixture(scope="module")
def trained(ray_api: RayApi, owner: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """user ``owner``'s LoRA, trained once for the module."""
    return train(ray_api, owner.api_key, "me", COLORS)


# 1. end to end ------------------------------------------------------------------------------------

def test_train_download_load_and_generate(ray_api: RayApi, ray_tiny_dir: Path, owner: Any,
                                          trained: tuple[dict[str, Any], dict[str, Any]],
                                          tmp_path: Path) -> None:
    lora, job = trained
    assert lora["status"] == "succeeded" and lora["base_model"] == "tiny-sd"
    assert job["attempts"] == 1
    check_charged_once(ray_api, owner.user.id, job)
    assert lora["weights_url"] and lora["validation_url"], lora
    assert lora["summary"]["rank"] == 4 and lora["summary"]["steps"] == 6, lora["summary"]
    validation = Image.open(io.BytesIO(ray_api.download(lora["validation_url"])))
    assert validation.format == "PNG"

    # The weights load into a fresh diffusers pipeline with plain load_lora_weights.
    weights = tmp_path / "pytorch_lora_weights.safetensors"
    weights.write_bytes(ray_api.download(lora["weights_url"]))
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert any("lora" in k for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    pipe = StableDiffusionPipeline.from_pretrained(str(ray_tiny_dir / "tiny-sd"))
    pipe.load_lora_weights(str(tmp_path), weight_name=weights.name)
    assert pipe.get_list_adapters(), "no adapter was loaded"
    del pipe

    # Over the API: the LoRA changes the pixels; scale 0 is the same as no LoRA.
    key = owner.api_key
    plain = gen(ray_api, key)
    with_lora = gen(ray_api, key, [{"id": lora["id"], "scale": 1.0}])
    zero = gen(ray_api, key, [{"id": lora["id"], "scale": 0.0}])
    assert plain.std() > 0
    assert not np.array_equal(plain, with_lora), "the LoRA did not change the output"
    assert np.array_equal(plain, zero), "scale 0 must equal no LoRA"


# 2. bad uses --------------------------------------------------------------------------------------

def test_another_users_lora_is_not_found(ray_api: RayApi, trained: tuple[dict[str, Any], dict[str, Any]]) -> None:
    other = ray_api.user(credits=50)
    with ray_api.http(other.api_key) as client:
        r = client.post("/v1/jobs", json={"model": "tiny-sd",
                                          "input": {**GEN, "loras": [{"id": trained[0]["id"], "scale": 1.0}]}})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
        assert client.get(f"/v1/loras/{trained[0]['id']}").status_code == 404
    assert [e.kind for e in ray_api.ledger(other.user.id)] == ["grant"]  # the sign-up credits only


def test_lora_on_another_model_is_invalid(ray_api: RayApi, owner: Any,
                                          trained: tuple[dict[str, Any], dict[str, Any]]) -> None:
    before = len(ray_api.ledger(owner.user.id))
    with ray_api.http(owner.api_key) as client:
        r = client.post("/v1/jobs", json={"model": "tiny-wan", "input": {
            "prompt": "waves", "width": 64, "height": 48, "num_frames": 5, "fps": 4, "steps": 2,
            "loras": [{"id": trained[0]["id"], "scale": 1.0}]}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_input"
    assert len(ray_api.ledger(owner.user.id)) == before


def test_deleted_lora_fails_fast_and_refunds(ray_api: RayApi) -> None:
    from api.core import ledger
    from api.db.tables import Job

    user = ray_api.user(credits=200)
    lora, _ = train(ray_api, user.api_key, "short-lived", COLORS[:2], steps=2)
    lora_id = lora["id"]
    with ray_api.http(user.api_key) as client:
        assert client.delete(f"/v1/loras/{lora_id}").status_code == 204
        assert client.get(f"/v1/loras/{lora_id}").status_code == 404
        # A new submit is refused: the LoRA is gone for its owner too, and nothing is reserved.
        before = len(ray_api.ledger(user.user.id))
        r = client.post("/v1/jobs", json={"model": "tiny-sd",
                                          "input": {**GEN, "loras": [{"id": lora_id, "scale": 1.0}]}})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
        assert len(ray_api.ledger(user.user.id)) == before
    # A job admitted before the delete (its row and reservation written as the API does at submit)
    # fails fast when the runner picks it up, with a clear code, and is refunded.
    with ray_api.db.session() as session:
        job = Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i",
                  input={**GEN, "loras": [{"id": lora_id, "scale": 1.0}]}, max_attempts=3,
                  credits_reserved=1, stage="queued")
        session.add(job)
        session.flush()
        ledger.reserve(session, user.user.id, job.id, 1)
        session.commit()
        job_id = job.id
    started = time.monotonic()
    done = ray_api.wait(user.api_key, job_id, timeout_s=30)
    assert time.monotonic() - started < 15
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "lora_unavailable", done["error"]
    assert done["attempts"] <= 1 and not done["outputs"]
    assert done["credits"]["charged"] == 0 and done["credits"]["refunded"] == 1
    kinds = sorted(e.kind for e in ray_api.ledger(user.user.id, job_id))
    assert kinds == ["refund", "reserve"], kinds


# 3. multiplexing ----------------------------------------------------------------------------------

def test_two_users_adapters_multiplexed_on_one_replica(ray_api: RayApi, owner: Any,
                                                       trained: tuple[dict[str, Any], dict[str, Any]]) -> None:
    other = ray_api.user(credits=500)
    other_lora, other_job = train(ray_api, other.api_key, "pet", COLORS[2:] + COLORS[:2], seed=17)
    check_charged_once(ray_api, other.user.id, other_job)
    users = [(owner.api_key, trained[0]["id"]), (other.api_key, other_lora["id"])]
    scale = 0.9  # an adapter set neither earlier test used, so this test's loads start at zero
    prompt = {"prompt": "a photo of sks, multiplexed"}

    def set_loads() -> dict[str, int]:
        loads = ray_api.stack.handles["tiny-sd"].stats.remote().result(timeout_s=60)["adapter_loads"]
        return {lora_id: sum(n for set_id, n in loads.items() if f'"{lora_id}"' in set_id and "0.9" in set_id)
                for _, lora_id in users}

    assert set_loads() == {users[0][1]: 0, users[1][1]: 0}
    # One reference per adapter, each made alone.
    reference = {lora_id: gen(ray_api, key, [{"id": lora_id, "scale": scale}], **prompt) for key, lora_id in users}
    assert not np.array_equal(reference[users[0][1]], reference[users[1][1]])
    # Alternate several times on the one replica.
    for _ in range(3):
        for key, lora_id in users:
            out = gen(ray_api, key, [{"id": lora_id, "scale": scale}], **prompt)
            assert np.array_equal(out, reference[lora_id]), f"wrong adapter applied for {lora_id}"
    # Both sets fit the cache (4 a replica): each was loaded exactly once.
    assert set_loads() == {users[0][1]: 1, users[1][1]: 1}


# 4. crash and resume ------------------------------------------------------------------------------

def trainer_actor_names() -> list[tuple[str, str]]:
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and "trainer" in a["name"]]


def test_training_resumes_after_its_replica_is_killed(ray_api: RayApi) -> None:
    import ray

    user = ray_api.user(credits=500)
    steps = 120  # the API checkpoints every steps // 4 = 30 steps
    token = ray_api.hold(step=1)  # held after its first checkpoint (serve.testhooks), until released
    body = start_training(ray_api, user.api_key, "crashy", COLORS, steps=steps, trigger_word=token)
    job_id = body["job"]["id"]
    ray_api.wait_held(job_id, timeout_s=120)
    deadline = time.monotonic() + 60  # the runner records the checkpoint event it was sent before the hold
    while not ray_api.db_job(job_id).resume.get("checkpoint_key"):
        assert ray_api.db_job(job_id).status in ("queued", "running"), ray_api.job(user.api_key, job_id)
        assert time.monotonic() < deadline, "the checkpoint was not recorded"
        time.sleep(0.05)
    checkpoint_step = int(ray_api.db_job(job_id).resume["step"])
    assert 0 < checkpoint_step < steps
    names = trainer_actor_names()
    assert len(names) == 1, names
    name, namespace = names[0]
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    ray_api.release(job_id)  # the retry on the new trainer is not held again

    job = ray_api.wait(user.api_key, job_id, timeout_s=240)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2, job
    check_charged_once(ray_api, user.user.id, job)
    resumed_from = job["result"]["resumed_from"]
    assert resumed_from >= checkpoint_step > 0, job["result"]
    assert job["result"]["steps"] == steps
    with ray_api.http(user.api_key) as client:
        lora = client.get(f"/v1/loras/{body['id']}").json()
    assert lora["status"] == "succeeded" and lora["weights_url"]


# 5. the CLI --------------------------------------------------------------------------------------

def test_cli_train_uploads_a_folder_trains_and_prints_the_lora_id(ray_api: RayApi, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from api.settings import get_settings
    from ops.cli import app

    user = ray_api.user(credits=200)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate(COLORS):
        (photos / f"p{i}.png").write_bytes(png_bytes(color))
    (photos / "p0.txt").write_text("sks on a red background")
    monkeypatch.setenv("CINEWEAVE_API_URL", ray_api.url)
    monkeypatch.setenv("CINEWEAVE_API_KEY", user.api_key)
    get_settings(fresh=True)
    try:
        result = CliRunner().invoke(app, ["train", "--images", str(photos), "--name", "cli", "--base", "tiny-sd",
                                          "--steps", "4", "--resolution", "64", "--rank", "4"])
    finally:
        monkeypatch.undo()
        get_settings(fresh=True)
    assert result.exit_code == 0, result.output
    lora_id = result.stdout.strip().splitlines()[-1]
    assert lora_id.startswith("lora_")
    with ray_api.http(user.api_key) as client:
        lora = client.get(f"/v1/loras/{lora_id}").json()
    assert lora["status"] == "succeeded" and lora["name"] == "cli" and lora["weights_url"]
    assert lora["params"]["steps"] == 4
