"""Per-user limits: prompt length, content-policy words, active jobs, requests per minute."""

from __future__ import annotations

import pytest

from api.core.errors import ConcurrencyLimit, ContentPolicy, InvalidInput, RateLimited
from api.core.limits import (
    blocked_words,
    check_active_jobs,
    check_content_policy,
    check_prompt_length,
    check_rate,
)


def test_prompt_length_at_the_limit_passes_and_over_fails() -> None:
    check_prompt_length("x" * 500, 500)
    with pytest.raises(InvalidInput) as info:
        check_prompt_length("x" * 501, 500)
    assert info.value.details == {"field": "prompt", "max_chars": 500, "length": 501}
    assert (info.value.status, info.value.code) == (422, "invalid_input")


@pytest.mark.parametrize(("texts", "words", "found"), [
    (["a Gory scene"], ["gory"], ["gory"]),                 # case-insensitive
    (["a gorynych dragon"], ["gory"], []),                   # whole words only
    (["so, gory!"], ["gory"], ["gory"]),                     # punctuation is a boundary
    (["blood bath time"], ["blood bath"], ["blood bath"]),   # phrases
    (["blood and bath"], ["blood bath"], []),
    (["fine", "negative: gore"], ["gore"], ["gore"]),        # every text is checked
    (["a+b"], ["a+b"], ["a+b"]),                             # regex characters are literal
    (["axb"], ["a.b"], []),
    (["anything"], ["", "  "], []),                          # blank entries are ignored
    (["one two"], ["two", "one"], ["two", "one"]),
])
def test_blocked_words(texts: list[str], words: list[str], found: list[str]) -> None:
    assert blocked_words(texts, words) == found


def test_content_policy_raises_without_echoing_the_words() -> None:
    check_content_policy(["a calm lake"], ["gore"])
    with pytest.raises(ContentPolicy) as info:
        check_content_policy(["GORE everywhere"], ["gore"])
    assert (info.value.status, info.value.code) == (422, "content_policy")
    assert "gore" not in info.value.message.lower()
    assert info.value.details == {}


def test_active_jobs_limit() -> None:
    check_active_jobs(2, 3)
    with pytest.raises(ConcurrencyLimit) as info:
        check_active_jobs(3, 3)
    assert (info.value.status, info.value.code) == (429, "concurrency_limit")
    assert info.value.details == {"active": 3, "limit": 3}


def test_rate_limit() -> None:
    check_rate(4, 5)
    with pytest.raises(RateLimited) as info:
        check_rate(5, 5)
    assert (info.value.status, info.value.code) == (429, "rate_limited")
    assert info.value.details["retry_after_s"] == 60
