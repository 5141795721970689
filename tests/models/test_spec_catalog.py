"""Spec validation, the shipped catalog, the registry and the import boundaries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from models.catalog import BUILTIN_DIR, Catalog
from models.registry import family_names, get_family
from models.spec import CatalogError, load_spec_file

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
REAL = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan2.1-i2v-14b-480p": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "ltx-video": "Lightricks/LTX-Video",
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "expected"), [
    ("id: x\nkind: image\ntasks: [t2v]\nfamily: stable_diffusion\nsource: {tiny: x}\n",
     "tasks ['t2v'] do not fit kind image"),
    ("id: x\nkind: image\ntasks: [t2i]\nfamily: stable_diffusion\nsource: {tiny: x, path: /a}\n",
     "source: Value error, source needs exactly one of path, s3, hf_repo, tiny"),
    ("id: x\nkind: image\ntasks: [t2i]\nfamily: stable_diffusion\nsource: {s3: bucket/a}\n",
     "source.s3 must start with s3://"),
    ("id: x\nkind: image\ntasks: [t2i]\n", "a local model needs source and family"),
    ("id: x\nkind: image\ntasks: [t2i]\nfamily: f\nsource: {tiny: x}\nsurprise: 1\n",
     "surprise: Extra inputs are not permitted"),
    ("id: x\nkind: image\ntasks: [t2i]\nfamily: f\nsource: {tiny: x}\ndefaults: {strength: 2}\n",
     "defaults.strength: Input should be less than or equal to 1"),
    ("- not a mapping\n", "expected a mapping at the top level"),
    ("id: [unclosed\n", "not valid YAML"),
])
def test_spec_errors_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_spec_file(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_new_optional_spec_fields_default_empty(tmp_path: Path) -> None:
    spec = load_spec_file(_write(tmp_path, "id: x\nkind: image\ntasks: [t2i]\nfamily: f\nsource: {tiny: x}\n"))
    assert spec.pipeline_kwargs == {}
    assert spec.defaults.strength is None
    assert spec.resources.gpu_memory_gb is None


def test_catalog_ships_tiny_and_real_entries(catalog: Catalog) -> None:
    ids = {s.id for s in catalog.all()}
    assert {"tiny-sd", "tiny-wan", "tiny-wan-i2v", *REAL} <= ids
    i2v = catalog.get("tiny-wan-i2v")
    assert i2v is not None and i2v.kind == "video" and i2v.tasks == ["i2v"] and i2v.source
    assert i2v.source.tiny == "tiny-wan-i2v" and i2v.family == "wan"
    for model_id, repo in REAL.items():
        spec = catalog.get(model_id)
        assert spec is not None and spec.source is not None
        assert spec.source.hf_repo == repo
        assert spec.source.revision != "main", "a moving ref is not a pin: leave it null"
        assert spec.resources.num_gpus == 1 and spec.resources.memory_gb and spec.resources.gpu_memory_gb
        assert spec.dtype in ("float16", "bfloat16")
        assert spec.defaults.width <= spec.limits.max_width and spec.defaults.height <= spec.limits.max_height
        assert spec.defaults.width % spec.limits.size_multiple == 0
        assert spec.defaults.height % spec.limits.size_multiple == 0
        if spec.kind == "video":
            lim, frames = spec.limits, spec.defaults.num_frames
            assert frames is not None and lim.frame_multiple
            assert (frames - lim.frame_offset) % lim.frame_multiple == 0
            assert lim.min_frames is not None and lim.max_frames is not None
            assert lim.min_frames <= frames <= lim.max_frames


def test_every_local_spec_has_a_registered_family(catalog: Catalog) -> None:
    for spec in catalog.all():
        if not spec.remote_only:
            assert spec.family in family_names(), spec.id
            family = get_family(spec.family)
            assert set(spec.tasks) <= family.tasks, spec.id
            assert family.kind == spec.kind, spec.id


def test_unknown_family_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown model family 'nope'; known: flux, ltx, sd_upscale, stable_diffusion, wan"):
        get_family("nope")


def test_catalog_extra_dir_overrides(tmp_path: Path) -> None:
    text = (BUILTIN_DIR / "tiny-sd.yaml").read_text().replace("measured_run_s: 0.5", "measured_run_s: 9.5")
    (tmp_path / "tiny-sd.yaml").write_text(text)
    spec = Catalog.load(tmp_path).get("tiny-sd")
    assert spec is not None and spec.measured_run_s == 9.5


def test_spec_catalog_sources_registry_import_without_torch() -> None:
    code = ("import sys, models.spec, models.catalog, models.sources, models.registry; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=MODELS_DIR.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_models_never_imports_api_or_serve() -> None:
    offenders = []
    for path in MODELS_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in {"api", "serve"}]
    assert not offenders
