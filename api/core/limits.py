"""Per-user limits, checked before any credit moves."""

from __future__ import annotations

import re
from collections.abc import Iterable

from api.core.errors import ConcurrencyLimit, ContentPolicy, InvalidInput, RateLimited


def check_prompt_length(prompt: str, max_chars: int) -> None:
    if len(prompt) > max_chars:
        raise InvalidInput(f"prompt is {len(prompt)} characters; the limit is {max_chars}",
                           {"field": "prompt", "max_chars": max_chars, "length": len(prompt)})


def blocked_words(texts: Iterable[str], words: Iterable[str]) -> list[str]:
    """The policy words found, matched case-insensitively as whole words (or phrases)."""
    found: list[str] = []
    joined = "\n".join(t for t in texts if t)
    for word in words:
        word = word.strip()
        if word and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", joined, flags=re.IGNORECASE):
            found.append(word)
    return found


def check_content_policy(texts: Iterable[str], words: Iterable[str]) -> None:
    if blocked_words(texts, words):
        # The words themselves are not echoed back: the list is the operator's business.
        raise ContentPolicy("the request contains words the content policy does not allow")


def check_active_jobs(active: int, limit: int) -> None:
    if active >= limit:
        raise ConcurrencyLimit(f"{active} jobs are already active; the limit is {limit}",
                               {"active": active, "limit": limit})


def check_rate(recent: int, per_minute: int) -> None:
    if recent >= per_minute:
        raise RateLimited(f"at most {per_minute} generation requests per minute",
                          {"limit": per_minute, "retry_after_s": 60})
