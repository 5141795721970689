"""Overflow adapters: run a job at Replicate or at Google Veo (Gemini API) behind the Executor port.

Plain asyncio + httpx: nothing here needs Ray or torch (the poster frame uses ffmpeg from
imageio-ffmpeg, loaded when a video arrives). ``make_providers`` builds the adapters whose
credentials are configured, keyed by the catalog's ``overflow.provider`` names.
"""

from __future__ import annotations

from typing import Any

from api.settings import Settings
from api.storage.base import Storage
from serve.fallback.base import ClientFactory, ProviderExecutor
from serve.fallback.http import RetryPolicy
from serve.fallback.replicate import ReplicateExecutor
from serve.fallback.veo import VeoExecutor


def make_providers(settings: Settings, storage: Storage, catalog: Any | None = None, *,
                   client_factory: ClientFactory | None = None,
                   retry: RetryPolicy | None = None) -> dict[str, ProviderExecutor]:
    """``{"replicate": …, "veo": …}`` for each provider whose API key is set."""
    providers: dict[str, ProviderExecutor] = {}
    if settings.replicate_api_token:
        providers["replicate"] = ReplicateExecutor(settings, storage, catalog, client_factory=client_factory,
                                                   retry=retry)
    if settings.gemini_api_key:
        providers["veo"] = VeoExecutor(settings, storage, catalog, client_factory=client_factory, retry=retry)
    return providers


__all__ = ["ProviderExecutor", "ReplicateExecutor", "RetryPolicy", "VeoExecutor", "make_providers"]
