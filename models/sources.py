"""Where a model's weights are, and whether they are there: no torch, no diffusers.

A spec's ``source`` is one of ``tiny`` (a checkpoint built by :mod:`models.tiny`), ``path`` (a local
diffusers directory), ``s3`` (``s3://bucket/prefix``, copied once into a local cache and checked
against a manifest) or ``hf_repo`` + ``revision`` (the Hugging Face cache). This module answers
"is it available, and if not what should the operator set" (:func:`availability`, cheap, local,
no network) and "give me the local directory" (:func:`resolve_source`). It imports neither torch
nor diffusers, so the API and the Serve app builder can call it; the torch side is
:mod:`models.loading`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from models.spec import ModelSpec

logger = logging.getLogger(__name__)

TINY_MARKER = "cineweave-tiny.json"  # the same name models.tiny writes (kept here to stay torch-free)
MANIFEST = ".cineweave-manifest.json"
"""Written last into an S3 download: ``{"source", "files": {relative path: size}}``."""

HfDownloader = Callable[[str, str | None, Path | None], Path]
"""``(repo_id, revision, cache_dir) -> local dir``; given by the torch side when downloads are allowed."""


class ModelUnavailable(RuntimeError):
    """The weights of a model cannot be found or fetched; the message names what to set."""


@dataclass(frozen=True)
class S3Config:
    """Endpoint and credentials for S3 sources, handed in by the caller (models never reads settings)."""

    endpoint: str
    access_key: str | None = None
    secret_key: str | None = None
    secure: bool = False
    region: str | None = None
    session_token: str | None = None

    def client(self) -> Any:
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                     session_token=self.session_token, secure=self.secure, region=self.region)


class S3Client(Protocol):
    """The part of ``minio.Minio`` this module uses (a fake in unit tests)."""

    def list_objects(self, bucket_name: str, prefix: str | None = None, recursive: bool = False) -> Any: ...

    def fget_object(self, bucket_name: str, object_name: str, file_path: str) -> Any: ...


# --- helpers -----------------------------------------------------------------------------------

def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


def s3_cache_path(cache_dir: Path, uri: str) -> Path:
    bucket, prefix = parse_s3_uri(uri)
    parts = [p for p in PurePosixPath(prefix).parts if p not in ("", ".", "..")]
    return Path(cache_dir) / "s3" / bucket / Path(*parts) if parts else Path(cache_dir) / "s3" / bucket


def check_diffusers_dir(path: Path) -> str | None:
    """Return what is missing from a diffusers checkpoint directory, or None when it looks whole.

    Checks ``model_index.json`` and that each component it names has a non-empty subfolder: enough
    to tell "not downloaded" or "half downloaded" from "there", without reading any weights.
    """
    path = Path(path)
    index = path / "model_index.json"
    if not path.is_dir():
        return f"{path} is not a directory"
    if not index.is_file():
        return f"{path} has no model_index.json (not a diffusers checkpoint)"
    try:
        components = json.loads(index.read_text())
    except ValueError as exc:
        return f"{index} is not valid JSON: {exc}"
    missing = []
    for name, value in components.items():
        is_component = (not name.startswith("_") and isinstance(value, list) and len(value) == 2
                        and value[0] is not None)
        if is_component and not ((path / name).is_dir() and any((path / name).iterdir())):
            missing.append(name)
    if missing:
        return f"{path} lacks component folder(s) {', '.join(sorted(missing))}"
    return None


def manifest_ok(path: Path) -> bool:
    """True when ``path`` holds a completed S3 download: manifest present, every file at its size."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        files: dict[str, int] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, size in files.items():
        f = Path(path) / rel
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(files)


def fetch_s3(client: S3Client, uri: str, cache_dir: Path) -> Path:
    """Copy every object under ``uri`` into the cache once and return the local directory.

    A copy whose manifest checks out is reused without touching the network. Otherwise objects
    are downloaded into a staging directory, each checked against its listed size, the manifest is
    written, and the directory renamed into place, so a crash never leaves a copy that looks whole.
    """
    target = s3_cache_path(cache_dir, uri)
    if manifest_ok(target):
        logger.debug("reusing cached copy of %s at %s", uri, target)
        return target
    bucket, prefix = parse_s3_uri(uri)
    list_prefix = f"{prefix}/" if prefix else ""
    try:
        objects = [o for o in client.list_objects(bucket, prefix=list_prefix, recursive=True)
                   if not getattr(o, "is_dir", False)]
    except Exception as exc:  # minio raises S3Error / urllib3 errors; all mean "cannot list"
        raise ModelUnavailable(f"cannot list {uri}: {exc}") from exc
    if not objects:
        raise ModelUnavailable(f"no objects under {uri}: upload the diffusers checkpoint directory there "
                               f"or change source.s3")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    files: dict[str, int] = {}
    try:
        for obj in objects:
            rel = obj.object_name[len(list_prefix):]
            if not rel or rel == MANIFEST:
                continue
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.fget_object(bucket, obj.object_name, str(dest))
            size = dest.stat().st_size
            if obj.size is not None and size != obj.size:
                raise ModelUnavailable(f"s3://{bucket}/{obj.object_name}: got {size} bytes, listed {obj.size}")
            files[rel] = size
        (staging / MANIFEST).write_text(json.dumps({"source": uri, "files": files}, indent=1))
        if target.exists():
            if manifest_ok(target):  # someone else finished first
                shutil.rmtree(staging, ignore_errors=True)
                return target
            shutil.rmtree(target)
        staging.rename(target)
    except ModelUnavailable:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelUnavailable(f"download of {uri} failed: {exc}") from exc
    logger.info("downloaded %s (%d files, %d bytes) to %s", uri, len(files), sum(files.values()), target)
    return target


def hf_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def find_hf_snapshot(repo: str, revision: str | None, hf_cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot of ``repo@revision`` if it is present and whole, else None (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo, revision=revision, cache_dir=hf_cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        return None
    return path if check_diffusers_dir(path) is None else None


def _hf_hint(spec: ModelSpec, hf_cache_dir: Path | None) -> str:
    from huggingface_hub import constants

    src = spec.source
    assert src is not None and src.hf_repo
    rev = src.revision or "main"
    cache = hf_cache_dir or constants.HF_HUB_CACHE
    return (f"weights for {spec.id} not found: set source.path to a local diffusers directory, or put "
            f"{src.hf_repo} (revision {rev}) in the Hugging Face cache (HF_HOME; looked in {cache}), "
            f"e.g. `hf download {src.hf_repo}"
            f"{' --revision ' + src.revision if src.revision else ''}` on a machine with network")


def _tiny_hint(spec: ModelSpec, tiny_dir: Path | None) -> str:
    name = spec.source.tiny if spec.source else spec.id
    where = f"in {tiny_dir}" if tiny_dir else "(no tiny checkpoint directory given)"
    return (f"tiny checkpoint {name} not built {where}: run `cineweave models make-tiny DIR` and set "
            f"CINEWEAVE_TINY_MODELS_DIR to DIR")


# --- the two questions ------------------------------------------------------------------------

def availability(spec: ModelSpec, tiny_dir: Path | None, cache_dir: Path | None, *,
                 hf_cache_dir: Path | None = None, s3: S3Config | None = None) -> tuple[bool, str]:
    """``(available, reason)`` for a spec, from local state only (never the network).

    ``cache_dir`` is where S3 sources are copied; ``hf_cache_dir`` the Hugging Face hub cache
    (None: ``HF_HOME``'s). An S3 source not yet copied counts as available when ``s3`` credentials
    are given (it is fetched on first load). Remote-only specs are available (their provider runs
    them). The reason is a full sentence for ``GET /v1/models`` and logs.
    """
    if spec.remote_only:
        return True, f"{spec.id} runs on {spec.overflow.provider}"
    src = spec.source
    if src is None:
        return False, f"{spec.id} has no source: set source.path, source.s3 or source.hf_repo"
    if src.tiny:
        if tiny_dir is not None and (Path(tiny_dir) / src.tiny / TINY_MARKER).is_file():
            return True, f"tiny checkpoint {src.tiny} in {tiny_dir}"
        return False, _tiny_hint(spec, tiny_dir)
    if src.path:
        problem = check_diffusers_dir(Path(src.path))
        if problem is None:
            return True, f"local weights at {src.path}"
        return False, f"weights for {spec.id} not found: {problem}; set source.path to a diffusers directory"
    if src.s3:
        if cache_dir is not None and manifest_ok(s3_cache_path(cache_dir, src.s3)):
            return True, f"cached copy of {src.s3} in {cache_dir}"
        if s3 is not None and cache_dir is not None:
            return True, f"{src.s3} is fetched into {cache_dir} on first load"
        return False, (f"weights for {spec.id} are in {src.s3} but "
                       + ("no model cache directory was given" if cache_dir is None
                          else "no S3 endpoint/credentials were given")
                       + ": configure the S3 storage settings and a model cache directory, or set source.path")
    if src.hf_repo:
        if find_hf_snapshot(src.hf_repo, src.revision, hf_cache_dir) is not None:
            return True, f"{src.hf_repo} in the Hugging Face cache"
        return False, _hf_hint(spec, hf_cache_dir)
    return False, f"{spec.id}: unsupported source"


def resolve_source(spec: ModelSpec, tiny_dir: Path | None = None, cache_dir: Path | None = None, *,
                   hf_cache_dir: Path | None = None, s3: S3Config | None = None,
                   s3_client: S3Client | None = None, hf_download: HfDownloader | None = None) -> Path:
    """The local diffusers directory for a spec, fetching S3 (and, given ``hf_download``, HF) once.

    Raises :class:`ModelUnavailable` with a message naming what to set. Hugging Face downloads
    happen only when ``hf_download`` is given and ``HF_HUB_OFFLINE`` is not set; otherwise only the
    local cache is used.
    """
    if spec.remote_only or spec.source is None:
        raise ModelUnavailable(f"{spec.id} has no local weights (remote only or no source)")
    src = spec.source
    if src.tiny:
        path = Path(tiny_dir) / src.tiny if tiny_dir is not None else None
        if path is None or not (path / TINY_MARKER).is_file():
            raise ModelUnavailable(_tiny_hint(spec, tiny_dir))
        return path
    if src.path:
        problem = check_diffusers_dir(Path(src.path))
        if problem:
            raise ModelUnavailable(f"weights for {spec.id} not found: {problem}; set source.path")
        return Path(src.path)
    if src.s3:
        if cache_dir is None:
            raise ModelUnavailable(f"{spec.id}: an S3 source needs a model cache directory")
        cached = s3_cache_path(cache_dir, src.s3)
        if not manifest_ok(cached):
            client = s3_client or (s3.client() if s3 is not None else None)
            if client is None:
                raise ModelUnavailable(f"weights for {spec.id} are in {src.s3}: give S3 endpoint/credentials")
            cached = fetch_s3(client, src.s3, cache_dir)
        problem = check_diffusers_dir(cached)
        if problem:
            raise ModelUnavailable(f"{src.s3} is not a diffusers checkpoint: {problem}")
        return cached
    if src.hf_repo:
        found = find_hf_snapshot(src.hf_repo, src.revision, hf_cache_dir)
        if found is not None:
            return found
        if hf_download is None or hf_offline():
            raise ModelUnavailable(_hf_hint(spec, hf_cache_dir)
                                   + (" (HF_HUB_OFFLINE is set)" if hf_offline() else ""))
        try:
            path = hf_download(src.hf_repo, src.revision, hf_cache_dir)
        except Exception as exc:  # network, auth (gated repos), disk: all mean "not available"
            raise ModelUnavailable(f"{_hf_hint(spec, hf_cache_dir)}; download failed: {exc}") from exc
        problem = check_diffusers_dir(path)
        if problem:
            raise ModelUnavailable(f"{src.hf_repo}: {problem}")
        return path
    raise ModelUnavailable(f"{spec.id}: unsupported source")
