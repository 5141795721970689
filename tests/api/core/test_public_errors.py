"""Client-facing failure messages: a failed URL fetch keeps our own (safe) text."""

from __future__ import annotations

from api.core.public_errors import GENERIC_MESSAGE, public_message
from api.services.egress import UrlFetchFailed


def test_url_fetch_failed_has_a_safe_message_and_keeps_our_own() -> None:
    exc = UrlFetchFailed("input.image", "the URL answered with HTTP 404", reason="status", status_code=404)
    assert public_message(exc.code, exc.message, trusted=True) == "input.image: the URL answered with HTTP 404"
    untrusted = public_message("url_fetch_failed", "connect to 10.0.0.7 failed")
    assert untrusted != GENERIC_MESSAGE and "10.0.0.7" not in untrusted
