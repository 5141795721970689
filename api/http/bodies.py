"""Request bodies read with a byte cap: a route that takes a raw body never holds more than its cap."""

from __future__ import annotations

from fastapi import Request

from api.services.uploads import PayloadTooLarge

# webhook callbacks (Stripe, Replicate) are small JSON documents; anything larger is refused unread
WEBHOOK_BODY_BYTES = 1024 * 1024


async def read_capped(request: Request, cap: int) -> bytes:
    """The body, or 413 ``payload_too_large`` as soon as the declared length or the bytes read pass ``cap``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"the request is {declared} bytes; the limit is {cap}", {"max_bytes": cap})
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise PayloadTooLarge(f"the request body is more than {cap} bytes", {"max_bytes": cap})
    return bytes(body)
