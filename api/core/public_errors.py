"""The message a client sees for a failed job: a stable text per error code, never internal detail.

Executors and providers end a run with ``ErrorEvent(code, message)`` where the message may carry
exception text (paths, hosts, provider responses, credentials in a URL). Only the code crosses to
the client with the safe text below; the raw message goes to the log with the job id. Messages our
own validation wrote (``trusted``: an :class:`~api.core.errors.CineWeaveError` raised by the API's
input resolution) are kept for the allow-listed codes, where they tell the client what to fix.
"""

from __future__ import annotations

GENERIC_MESSAGE = "generation failed"

SAFE_MESSAGES: dict[str, str] = {
    "canceled": "the job was canceled",
    "out_of_memory": "the model ran out of GPU memory; try a smaller size, fewer frames or fewer steps",
    "invalid_input": "the input was refused by the model",
    "url_not_allowed": "the URL is not allowed",
    "url_fetch_failed": "the input URL could not be fetched",
    "content_policy": "the request was refused by the content policy",
    "not_deployed": "this model is not deployed right now",
    "local_unavailable": "no capacity is available for this model right now",
    "executor_error": GENERIC_MESSAGE,
    "incomplete": "the generation ended without a result",
    "provider_error": "the generation provider failed",
    "provider_failed": "the generation provider failed",
    "provider_timeout": "the generation provider did not answer in time",
    "provider_not_configured": "this model's provider is not configured",
    "overflow_disabled": "this model runs only at a provider, and overflow is disabled",
    "worker_lost": "the worker running this job stopped",
    "queue_timeout": "no worker started this job in time",
    "lora_unavailable": "a LoRA of this request is not available",
    "timeout": "the generation took too long",
    "start_deadline_exceeded": "the job did not start before its Cancel-After deadline",
}

# Codes whose message may reach the client unchanged, when our own validation wrote it.
TRUSTED_CODES = frozenset({"invalid_input", "url_not_allowed", "url_fetch_failed", "content_policy",
                           "lora_unavailable", "invalid_upload", "not_found"})

MAX_MESSAGE_CHARS = 300


def public_message(code: str, message: str | None, *, trusted: bool = False) -> str:
    """The client-facing message for ``code``; ``message`` is kept only when trusted and allow-listed."""
    if trusted and code in TRUSTED_CODES and message:
        return message[:MAX_MESSAGE_CHARS]
    return SAFE_MESSAGES.get(code, GENERIC_MESSAGE)
