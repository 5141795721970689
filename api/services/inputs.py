"""Turn a job's stored input into what an executor needs, just before it runs.

``input.image`` may be an upload id, ``job:<id>`` of the caller's finished image job, or an
http(s) URL. Executors get a storage key (``image_key``) that a replica reads directly; remote
providers get the image inline (``image`` as a ``data:`` URI), since our storage is not public.
A URL is fetched once through the egress policy (:mod:`api.services.egress`: public addresses
only unless allow-listed, redirects re-checked, bounded in size and time), checked like an
upload, and stored. It was checked at submit too; it is checked again here since DNS can change.
A later attempt of the same job (after a reclaim) reuses the stored copy: the URL may be gone by
then, and the run it attaches to already used that image.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from api.core.errors import InvalidInput
from api.core.pipelines import POSTPROCESS_MODEL
from api.db.engine import Database
from api.db.tables import Job, Upload
from api.services.egress import EgressPolicy, fetch_sync
from api.services.uploads import IMAGE_FORMATS, check_image
from api.settings import Settings
from api.storage.base import Storage
from models.catalog import Catalog

logger = logging.getLogger(__name__)


def _owners(job: Job) -> tuple[str, ...]:
    """Whose uploads, LoRAs and jobs a job may use: its account's, and (a job submitted as a team)
    the submitting member's own, which submission checked."""
    return (job.user_id, job.submitted_by) if job.submitted_by else (job.user_id,)


def output_media(source: Job) -> dict[str, Any] | None:
    """A finished job's first output as a MediaInfo dict, its kind taken from the output itself
    (``video/*``, or a GIF with frames: video; another ``image/*``: image), so a pipeline's MP4
    is a video; None when the job has no media output (a training job's weights)."""
    if not source.outputs:
        return None
    first = source.outputs[0]
    content_type = str(first.get("content_type") or "").lower()
    if content_type.startswith("video/") or (content_type == "image/gif" and first.get("num_frames")):
        kind = "video"
    elif content_type.startswith("image/"):
        kind = "image"
    elif not content_type and source.kind in ("image", "video"):  # an output recorded without a type
        kind = source.kind
    else:
        return None
    return {"kind": kind, "width": int(first.get("width") or 0), "height": int(first.get("height") or 0),
            "num_frames": first.get("num_frames"), "fps": first.get("fps"),
            "duration_s": first.get("duration_s"), "has_audio": bool(first.get("has_audio")),
            "format": content_type.split("/")[-1] or None}


class InputResolver:
    def __init__(self, db: Database, settings: Settings, storage: Storage, catalog: Catalog) -> None:
        self.db = db
        self.settings = settings
        self.storage = storage
        self.catalog = catalog
        self.egress = EgressPolicy.from_settings(settings)

    def __call__(self, job: Job) -> dict[str, Any]:
        data = dict(job.input)
        if job.model == POSTPROCESS_MODEL:
            return self._postprocess(job, data)
        ref = data.get("image")
        if ref:
            key, content_type = self._image_key(job, ref)
            data["image_key"] = key
            spec = self.catalog.get(job.model)
            if spec is not None and spec.remote_only:
                blob = self.storage.get_bytes(key)
                data["image"] = f"data:{content_type};base64,{base64.b64encode(blob).decode()}"
        if data.get("loras"):
            data["loras"] = self._lora_weights(job, data["loras"])
        return data

    def _image_key(self, job: Job, ref: str) -> tuple[str, str]:
        if ref.startswith("job:"):
            with self.db.read() as session:
                source = session.get(Job, ref[4:])
            if source is None or source.user_id not in _owners(job) or not source.outputs:
                raise InvalidInput(f"input.image: job {ref[4:]} has no output", {"field": "image"})
            first = source.outputs[0]
            return first["key"], first.get("content_type", "image/png")
        if ref.startswith(("http://", "https://")):
            return self._fetch(job, ref)
        with self.db.read() as session:
            upload = session.get(Upload, ref)
        if upload is None or upload.user_id not in _owners(job):
            raise InvalidInput(f"input.image: upload {ref} not found", {"field": "image"})
        return upload.key, upload.content_type

    def _postprocess(self, job: Job, data: dict[str, Any]) -> dict[str, Any]:
        """A post-processing step's references as storage keys, each with what it holds.

        ``image``/``video`` → ``image_key``/``video_key`` + ``source_info`` (a MediaInfo dict),
        ``videos`` → ``video_keys`` + ``source_infos``, ``audio`` → ``audio_key`` (+ ``audio_info``),
        ``overlay`` → ``overlay_key`` (+ ``overlay_info``). A reference is an upload id or
        ``job:<id>`` (a released step's source: its first output), the job's owners' only.
        """
        from models.postprocess import input_fields

        for field, kinds in input_fields(job.task).items():
            value = data.get(field)
            if value in (None, "", []):
                continue
            if kinds.endswith("[]"):
                pairs = [self._media_key(job, field, ref, kinds) for ref in value]
                data[f"{field.rstrip('s')}_keys"] = [key for key, _ in pairs]
                data["source_infos"] = [info for _, info in pairs]
                continue
            key, info = self._media_key(job, field, value, kinds)
            if field in ("image", "video"):
                data[f"{field}_key"] = key
                data["source_info"] = info
            else:
                data[f"{field}_key"] = key
                data[f"{field}_info"] = info
        return data

    def _media_key(self, job: Job, field: str, ref: Any, kinds: str) -> tuple[str, dict[str, Any]]:
        """The storage key a reference names and its media description."""
        if not isinstance(ref, str) or ref.startswith("step:"):
            raise InvalidInput(f"input.{field}: {ref!r} was not resolved", {"field": field})
        with self.db.read() as session:
            if ref.startswith("job:"):
                source = session.get(Job, ref[4:])
                if source is None or source.user_id not in _owners(job) or not source.outputs:
                    raise InvalidInput(f"input.{field}: job {ref[4:]} has no output", {"field": field})
                info = output_media(source)
                if info is None:
                    raise InvalidInput(f"input.{field}: job {ref[4:]} has no image or video output",
                                       {"field": field})
                return source.outputs[0]["key"], info
            upload = session.get(Upload, ref)
        if upload is None or upload.user_id not in _owners(job):
            raise InvalidInput(f"input.{field}: upload {ref} not found", {"field": field})
        meta = upload.meta or {}
        if kinds == "audio":
            return upload.key, {"kind": "audio", "duration_s": meta.get("duration_s", meta.get("duration")),
                                "format": upload.content_type.split("/")[-1] or None}
        info = {"kind": upload.kind, "width": upload.width or meta.get("width") or 0,
                "height": upload.height or meta.get("height") or 0, "num_frames": meta.get("num_frames"),
                "fps": meta.get("fps"), "duration_s": meta.get("duration_s"),
                "has_audio": bool(meta.get("has_audio")), "format": upload.content_type.split("/")[-1] or None}
        return upload.key, info

    def _fetch(self, job: Job, url: str) -> tuple[str, str]:
        for _content_type, extension in IMAGE_FORMATS.values():
            stored = self.storage.stat(f"uploads/{job.user_id}/fetched-{job.id}.{extension}")
            if stored is not None:
                logger.info("job %s: reusing the image fetched by an earlier attempt", job.id)
                return stored.key, stored.content_type
        body = fetch_sync(self.egress, url, field="input.image", max_bytes=self.settings.max_upload_bytes)
        image = check_image(body.content, self.settings, name="input.image")
        key = f"uploads/{job.user_id}/fetched-{job.id}.{image.extension}"
        self.storage.put_bytes(key, image.data, image.content_type)
        return key, image.content_type

    def _lora_weights(self, job: Job, refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from api.db.tables import Lora

        out = []
        with self.db.read() as session:
            for ref in refs:
                lora = session.get(Lora, ref["id"])
                if lora is None or lora.user_id not in _owners(job) or lora.deleted_at is not None \
                        or not lora.weights_key:
                    raise InvalidInput(f"LoRA {ref['id']} was deleted", {"field": "loras"},
                                       code="lora_unavailable")
                out.append({"id": lora.id, "scale": ref.get("scale", 1.0), "weights_key": lora.weights_key})
        return out
