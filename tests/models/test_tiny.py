"""The tiny checkpoint factory: complete, deterministic, idempotent, loadable like a real checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    LTXPipeline,
    StableDiffusionPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
)

from models import tiny
from models.sources import check_diffusers_dir
from models.tiny import DEFAULT_TINY, MARKER, TINY_VERSION, is_built, make_tiny

EXPECTED = {
    "tiny-sd": StableDiffusionPipeline,
    "tiny-wan": WanPipeline,
    "tiny-wan-i2v": WanImageToVideoPipeline,
    "tiny-flux": FluxPipeline,
    "tiny-ltx": LTXPipeline,
}


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.safetensors"))}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tiny_checkpoint_loads_with_plain_from_pretrained(tiny_dir: Path, name: str) -> None:
    path = tiny_dir / name
    assert is_built(path)
    assert check_diffusers_dir(path) is None
    marker = json.loads((path / MARKER).read_text())
    assert marker == {"name": name, "version": TINY_VERSION, "pipeline": EXPECTED[name].__name__}
    pipe = DiffusionPipeline.from_pretrained(str(path))
    assert type(pipe) is EXPECTED[name]
    assert type(EXPECTED[name].from_pretrained(str(path))) is EXPECTED[name]


def test_wan_i2v_has_image_inputs(tiny_dir: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(str(tiny_dir / "tiny-wan-i2v"))
    assert pipe.transformer.config.image_dim == pipe.image_encoder.config.hidden_size
    assert pipe.transformer.config.in_channels == 36  # 16 noise + 4 mask + 16 condition
    assert pipe.image_processor is not None


def test_build_is_deterministic_and_skips_finished(tmp_path: Path, tiny_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    built = make_tiny(tmp_path, ["tiny-wan"])
    assert built == {"tiny-wan": tmp_path / "tiny-wan"}
    assert _digest(tmp_path / "tiny-wan") == _digest(tiny_dir / "tiny-wan"), "weights differ between builds"

    calls: list[str] = []
    real = tiny.build_one
    monkeypatch.setattr(tiny, "build_one", lambda name: calls.append(name) or real(name))
    make_tiny(tmp_path, ["tiny-wan"])
    assert calls == []  # marker present: skipped
    make_tiny(tmp_path, ["tiny-wan"], force=True)
    assert calls == ["tiny-wan"]
    assert _digest(tmp_path / "tiny-wan") == _digest(tiny_dir / "tiny-wan")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging dir left behind"


def test_half_built_checkpoint_is_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "tiny-wan").mkdir()
    (tmp_path / "tiny-wan" / "model_index.json").write_text("{}")  # crashed build: no marker
    assert not is_built(tmp_path / "tiny-wan")
    make_tiny(tmp_path, ["tiny-wan"])
    assert is_built(tmp_path / "tiny-wan")
    assert check_diffusers_dir(tmp_path / "tiny-wan") is None


def test_default_set_and_unknown_names(tmp_path: Path) -> None:
    assert DEFAULT_TINY == ("tiny-sd", "tiny-wan", "tiny-wan-i2v", "tiny-sd-x4-upscaler")
    with pytest.raises(KeyError, match="unknown tiny checkpoint"):
        make_tiny(tmp_path, ["tiny-nope"])
