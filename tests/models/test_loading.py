"""Source resolution, availability messages, device/dtype choice and optimization planning."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline

from models.catalog import Catalog
from models.loading import (
    ModelUnavailable,
    apply_optimizations,
    availability,
    choose_dtype,
    load_pipeline,
    plan_optimizations,
    resolve_source,
)
from models.sources import MANIFEST, fetch_s3, manifest_ok, s3_cache_path
from models.spec import ModelSpec
from tests.models.helpers import tiny_spec


def spec_with(base: ModelSpec, **changes: Any) -> ModelSpec:
    data = base.model_dump()
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ModelSpec.model_validate(data)


# --- dtype and optimization planning -----------------------------------------------------------

@pytest.mark.parametrize(("spec_dtype", "cuda", "bf16", "expected"), [
    ("auto", True, True, "bfloat16"),
    ("auto", True, False, "float16"),
    ("bfloat16", True, False, "float16"),
    ("float16", True, True, "float16"),
    ("float32", True, True, "float32"),
    ("auto", False, False, "float32"),
    ("float16", False, False, "float32"),
    ("bfloat16", False, True, "float32"),
])
def test_choose_dtype(spec_dtype: str, cuda: bool, bf16: bool, expected: str) -> None:
    assert choose_dtype(spec_dtype, cuda, bf16) == expected


def test_plan_optimizations(catalog: Catalog) -> None:
    sdxl = tiny_spec(catalog, "sdxl")  # xformers, channels-last, vae slicing, VAE tiling by frame size
    rest = ["channels_last", "vae_slicing", "vae_tiling_auto"]
    assert plan_optimizations(sdxl, cuda=True, xformers_available=True) == ["xformers", *rest]
    assert plan_optimizations(sdxl, cuda=True, xformers_available=False) == ["sdpa", *rest]
    assert plan_optimizations(sdxl, cuda=False, xformers_available=True) == ["sdpa", *rest]
    everything = spec_with(sdxl, optimizations={"cpu_offload": True, "vae_tiling": True, "torch_compile": True,
                                                "attention_slicing": True, "channels_last": True})
    assert plan_optimizations(everything, cuda=True, xformers_available=True) == [
        "xformers", "cpu_offload", "channels_last", "vae_slicing", "vae_tiling", "attention_slicing",
        "torch_compile"]
    # No CUDA: no offload and no xformers, the rest still applies (compile is allowed on CPU).
    assert plan_optimizations(everything, cuda=False, xformers_available=True) == [
        "sdpa", "channels_last", "vae_slicing", "vae_tiling", "attention_slicing", "torch_compile"]
    assert plan_optimizations(spec_with(tiny_spec(catalog, "tiny-sd"), optimizations={"vae_tiling": False}),
                              cuda=False, xformers_available=False) == ["sdpa"]


def test_apply_optimizations_on_cpu(tiny_dir: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(str(tiny_dir / "tiny-sd"))
    applied = apply_optimizations(pipe, ["sdpa", "vae_slicing", "vae_tiling", "attention_slicing"], "cpu", "unet")
    assert applied == ["sdpa", "vae_slicing", "vae_tiling", "attention_slicing"]
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert pipe.device.type == "cpu"


def test_xformers_failure_falls_back_to_sdpa(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = DiffusionPipeline.from_pretrained(str(tiny_dir / "tiny-sd"))

    def broken() -> None:
        raise RuntimeError("no xformers kernel for this device")

    monkeypatch.setattr(pipe, "enable_xformers_memory_efficient_attention", broken)
    assert apply_optimizations(pipe, ["xformers"], "cpu", "unet") == ["sdpa"]


@pytest.mark.slow
def test_torch_compile_wraps_denoiser_in_place(tiny_dir: Path, catalog: Catalog) -> None:
    spec = spec_with(tiny_spec(catalog, "tiny-sd"), optimizations={"torch_compile": True, "compile_mode": "full"})
    loaded = load_pipeline(spec, tiny_dir, compile_kwargs={"backend": "eager"})
    assert "torch_compile" in loaded.optimizations and "compile:full" in loaded.optimizations
    assert type(loaded.pipe.unet).__name__ == "UNet2DConditionModel"  # still the class LoRA loading expects
    assert loaded.pipe.unet._compiled_call_impl is not None
    out = loaded.pipe("x", width=64, height=64, num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_load_pipeline_cpu_float32(tiny_dir: Path, catalog: Catalog) -> None:
    loaded = load_pipeline(tiny_spec(catalog, "tiny-sd"), tiny_dir)
    assert loaded.device == "cpu" and loaded.dtype == "float32"
    assert loaded.optimizations == ["sdpa", "vae_tiling_auto"]
    assert loaded.pipe.unet.dtype == torch.float32
    assert loaded.path == tiny_dir / "tiny-sd"


def test_spec_scheduler_swaps_the_scheduler(tiny_dir: Path, catalog: Catalog) -> None:
    spec = spec_with(tiny_spec(catalog, "tiny-sd"), scheduler="EulerDiscreteScheduler")
    assert type(load_pipeline(spec, tiny_dir).pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_pipeline(spec_with(spec, scheduler="NoSuchScheduler"), tiny_dir)


# --- availability and sources --------------------------------------------------------------------

def test_availability_tiny(tiny_dir: Path, tmp_path: Path, catalog: Catalog) -> None:
    spec = tiny_spec(catalog, "tiny-wan-i2v")
    assert availability(spec, tiny_dir, None) == (True, f"tiny checkpoint tiny-wan-i2v in {tiny_dir}")
    ok, reason = availability(spec, tmp_path, None)
    assert not ok
    assert "tiny checkpoint tiny-wan-i2v not built" in reason and "cineweave models make-tiny" in reason
    ok, reason = availability(spec, None, None)
    assert not ok and "no tiny checkpoint directory given" in reason
    with pytest.raises(ModelUnavailable, match="not built"):
        resolve_source(spec, tmp_path)


def test_availability_of_real_models_names_what_to_set(catalog: Catalog, tmp_path: Path) -> None:
    for model_id, repo in [("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
                           ("ltx-video", "Lightricks/LTX-Video")]:
        ok, reason = availability(tiny_spec(catalog, model_id), None, tmp_path, hf_cache_dir=tmp_path / "hub")
        assert not ok
        assert reason.startswith(f"weights for {model_id} not found: set source.path")
        assert repo in reason and "Hugging Face cache (HF_HOME" in reason and str(tmp_path / "hub") in reason
    assert availability(tiny_spec(catalog, "veo-3.1"), None, None)[0]


def test_missing_hf_checkpoint_is_model_unavailable_even_with_a_downloader(catalog: Catalog,
                                                                            tmp_path: Path) -> None:
    calls: list[str] = []

    def downloader(repo: str, revision: str | None, cache: Path | None) -> Path:
        calls.append(repo)
        raise AssertionError("must not download while HF_HUB_OFFLINE is set")

    with pytest.raises(ModelUnavailable, match=r"FLUX.1-schnell.*HF_HUB_OFFLINE is set"):
        resolve_source(tiny_spec(catalog, "flux-schnell"), hf_cache_dir=tmp_path, hf_download=downloader)
    assert calls == []


def _fake_hf_cache(hub: Path, repo: str, source: Path, commit: str = "a" * 40) -> Path:
    """Lay a checkpoint out the way huggingface_hub caches a snapshot."""
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hf_source_from_the_local_cache_loads(tiny_dir: Path, tmp_path: Path, catalog: Catalog) -> None:
    spec = spec_with(tiny_spec(catalog, "tiny-sd"), id="cached-sd",
                     source={"tiny": None, "hf_repo": "example/cached-sd"})
    hub = tmp_path / "hub"
    snapshot = _fake_hf_cache(hub, "example/cached-sd", tiny_dir / "tiny-sd")
    assert availability(spec, None, None, hf_cache_dir=hub) == (True, "example/cached-sd in the Hugging Face cache")
    assert resolve_source(spec, hf_cache_dir=hub) == snapshot
    pinned = spec_with(spec, source={"revision": "a" * 40})
    assert resolve_source(pinned, hf_cache_dir=hub) == snapshot
    other = spec_with(spec, source={"revision": "b" * 40})
    assert not availability(other, None, None, hf_cache_dir=hub)[0]
    loaded = load_pipeline(spec, hf_cache_dir=hub)
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"


def test_hf_download_used_when_online_and_allowed(tiny_dir: Path, tmp_path: Path, catalog: Catalog,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    spec = spec_with(tiny_spec(catalog, "tiny-sd"), id="remote-sd",
                     source={"tiny": None, "hf_repo": "example/remote-sd", "revision": "c" * 40})
    calls: list[tuple[str, str | None]] = []

    def downloader(repo: str, revision: str | None, cache: Path | None) -> Path:
        calls.append((repo, revision))
        return tiny_dir / "tiny-sd"

    assert resolve_source(spec, hf_cache_dir=tmp_path, hf_download=downloader) == tiny_dir / "tiny-sd"
    assert calls == [("example/remote-sd", "c" * 40)]

    def failing(repo: str, revision: str | None, cache: Path | None) -> Path:
        raise OSError("connection refused")

    with pytest.raises(ModelUnavailable, match="download failed: connection refused"):
        resolve_source(spec, hf_cache_dir=tmp_path, hf_download=failing)


def test_path_source(tiny_dir: Path, tmp_path: Path, catalog: Catalog) -> None:
    spec = spec_with(tiny_spec(catalog, "tiny-sd"), source={"tiny": None, "path": str(tiny_dir / "tiny-sd")})
    assert availability(spec, None, None)[0]
    assert resolve_source(spec) == tiny_dir / "tiny-sd"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir / "tiny-sd", broken)
    shutil.rmtree(broken / "unet")
    ok, reason = availability(spec_with(spec, source={"path": str(broken)}), None, None)
    assert not ok and "lacks component folder(s) unet" in reason
    ok, reason = availability(spec_with(spec, source={"path": str(tmp_path / "nope")}), None, None)
    assert not ok and "is not a directory" in reason


@dataclass
class _Obj:
    object_name: str
    size: int
    is_dir: bool = False


class FakeS3:
    """``list_objects`` / ``fget_object`` over a local directory, counting downloads."""

    def __init__(self, root: Path, bucket: str, prefix: str, corrupt: str | None = None) -> None:
        self.root, self.bucket, self.prefix, self.corrupt = root, bucket, prefix, corrupt
        self.downloads = 0

    def list_objects(self, bucket_name: str, prefix: str | None = None, recursive: bool = False) -> list[_Obj]:
        assert bucket_name == self.bucket and recursive
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        return [_Obj(f"{self.prefix}/{p.relative_to(self.root).as_posix()}", p.stat().st_size) for p in files
                if f"{self.prefix}/".startswith(prefix or "")]

    def fget_object(self, bucket_name: str, object_name: str, file_path: str) -> None:
        self.downloads += 1
        rel = object_name[len(self.prefix) + 1:]
        data = (self.root / rel).read_bytes()
        if rel == self.corrupt:
            data = data[:-1]
        Path(file_path).write_bytes(data)


def test_s3_source_downloads_once_checks_sizes_and_reuses(tiny_dir: Path, tmp_path: Path,
                                                          catalog: Catalog) -> None:
    uri = "s3://weights/models/tiny-sd"
    spec = spec_with(tiny_spec(catalog, "tiny-sd"), source={"tiny": None, "s3": uri})
    cache = tmp_path / "cache"
    ok, reason = availability(spec, None, cache)
    assert not ok and "no S3 endpoint/credentials" in reason
    bad = FakeS3(tiny_dir / "tiny-sd", "weights", "models/tiny-sd", corrupt="unet/config.json")
    with pytest.raises(ModelUnavailable, match="got .* bytes, listed"):
        resolve_source(spec, cache_dir=cache, s3_client=bad)
    assert not s3_cache_path(cache, uri).exists() and not manifest_ok(s3_cache_path(cache, uri))
    assert [p for p in s3_cache_path(cache, uri).parent.iterdir()] == []  # no staging left

    client = FakeS3(tiny_dir / "tiny-sd", "weights", "models/tiny-sd")
    local = resolve_source(spec, cache_dir=cache, s3_client=client)
    assert local == s3_cache_path(cache, uri) == cache / "s3" / "weights" / "models" / "tiny-sd"
    assert manifest_ok(local) and (local / MANIFEST).is_file()
    first = client.downloads
    assert first > 5
    assert resolve_source(spec, cache_dir=cache, s3_client=client) == local
    assert client.downloads == first  # reused, nothing fetched again
    assert availability(spec, None, cache) == (True, f"cached copy of {uri} in {cache}")
    assert type(load_pipeline(spec, cache_dir=cache).pipe).__name__ == "StableDiffusionPipeline"

    # A truncated file in the cache fails the manifest check and is fetched again.
    victim = local / "unet" / "config.json"
    victim.write_text("{}")
    assert not manifest_ok(local)
    assert fetch_s3(client, uri, cache) == local and manifest_ok(local)


def test_s3_empty_prefix_is_unavailable(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelUnavailable, match="no objects under s3://b/nothing"):
        fetch_s3(FakeS3(empty, "b", "nothing"), "s3://b/nothing", tmp_path / "cache")


@pytest.mark.s3
@pytest.mark.slow
def test_s3_source_on_a_real_s3_server(s3_server: Any, tiny_dir: Path, tmp_path: Path, catalog: Catalog) -> None:
    from minio import Minio

    from models.sources import S3Config

    config = S3Config(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                      secret_key=s3_server.secret_key, secure=False, region=s3_server.region)
    client: Minio = config.client()
    bucket = "cineweave-models-test"
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    source = tiny_dir / "tiny-wan"
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        client.fput_object(bucket, f"checkpoints/tiny-wan/{path.relative_to(source).as_posix()}", str(path))
    spec = spec_with(tiny_spec(catalog, "tiny-wan"), source={"tiny": None, "s3": f"s3://{bucket}/checkpoints/tiny-wan"})
    cache = tmp_path / "cache"
    assert availability(spec, None, cache, s3=config)[0]
    loaded = load_pipeline(spec, cache_dir=cache, s3=config)
    assert loaded.path == cache / "s3" / bucket / "checkpoints" / "tiny-wan" and manifest_ok(loaded.path)
    assert type(loaded.pipe).__name__ == "WanPipeline"
    assert availability(spec, None, cache) == (True, f"cached copy of s3://{bucket}/checkpoints/tiny-wan in {cache}")


def test_wan_half_precision_keeps_vae_and_image_encoder_in_float32(tiny_dir: Path) -> None:
    from models.registry import get_family

    pipe = get_family("wan").load(tiny_dir / "tiny-wan-i2v", torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32 and pipe.image_encoder.dtype == torch.float32


def test_img2img_from_pipe_shares_modules_and_keeps_dtype(tiny_dir: Path) -> None:
    from models.registry import get_family

    family = get_family("stable_diffusion")
    base = family.load(tiny_dir / "tiny-sd", torch.float16)
    i2i = family.pipeline_for_task(base, "i2i")
    assert type(i2i).__name__ == "StableDiffusionImg2ImgPipeline"
    assert i2i.unet is base.unet and i2i.vae is base.vae  # no second copy of the weights
    assert base.unet.dtype == torch.float16  # from_pipe did not upcast the shared modules
    assert family.pipeline_for_task(base, "t2i") is base
