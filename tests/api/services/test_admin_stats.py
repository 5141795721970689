"""The operator's stats: success rate, failure reasons and overflow counts (issue 12, the Admin page)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from api.db.engine import Database
from api.db.tables import Job
from api.http.schemas import AdminStats
from api.services.admin import AdminService
from api.settings import Settings
from tests.fixtures.harness import ADMIN_KEY, ApiHarness, add_user, bearer


def _job(user_id: str, model: str, status: str, **fields: Any) -> Job:
    return Job(user_id=user_id, model=model, kind="image", task="t2i", status=status, **fields)


def _seed(db: Database, settings: Settings) -> None:
    user = add_user(db, settings, credits=10).user
    with db.session() as session:
        session.add_all([
            _job(user.id, "tiny-sd", "succeeded", provider="local", route_reason="local"),
            _job(user.id, "tiny-sd", "succeeded", provider="local", route_reason="local"),
            _job(user.id, "tiny-sd", "succeeded", provider="replicate", route_reason="wait", cost_usd=0.25),
            _job(user.id, "tiny-sd", "failed", error_code="timeout"),
            _job(user.id, "veo-3.1", "failed", error_code="content_policy", provider="veo", route_reason="remote_only",
                 cost_usd=0.5),
            _job(user.id, "veo-3.1", "failed", error_code="content_policy", provider="veo", route_reason="remote_only"),
            _job(user.id, "veo-3.1", "failed"),
            _job(user.id, "veo-3.1", "canceled"),
            _job(user.id, "veo-3.1", "queued"),
        ])
        session.commit()


def test_outcomes_failures_and_overflow(db: Database, settings: Settings) -> None:
    _seed(db, settings)
    stats = AdminService(db, settings).stats()
    # cancels and active jobs are not failures: 3 succeeded of 3 + 4 decided
    assert stats["outcomes"] == {"total": 9, "success_rate": round(3 / 7, 4), "by_status": {
        "succeeded": 3, "failed": 4, "canceled": 1, "queued": 1}}
    assert stats["failures"] == [
        {"model": "veo-3.1", "code": "content_policy", "jobs": 2},
        {"model": "tiny-sd", "code": "timeout", "jobs": 1},
        {"model": "veo-3.1", "code": "unknown", "jobs": 1},
    ]
    # local runs are not overflow
    assert stats["overflow"] == {"jobs": 3, "by_provider": {"replicate": 1, "veo": 2},
                                 "by_reason": {"wait": 1, "remote_only": 2}, "cost_usd": 0.75}
    AdminStats.model_validate(stats)


def test_empty_database_has_no_success_rate(db: Database, settings: Settings) -> None:
    stats = AdminService(db, settings).stats()
    assert stats["outcomes"] == {"total": 0, "by_status": {}, "success_rate": None}
    assert stats["failures"] == []
    assert stats["overflow"] == {"jobs": 0, "by_provider": {}, "by_reason": {}, "cost_usd": 0.0}


async def test_stats_route_answers_the_new_fields(make_api: Callable[..., Awaitable[ApiHarness]]) -> None:
    api = await make_api(run_runner=False)  # the seeded queued job stays queued
    _seed(api.db, api.settings)
    body = (await api.client.get("/v1/admin/stats", headers=bearer(ADMIN_KEY))).json()
    assert body["outcomes"]["success_rate"] == round(3 / 7, 4)
    assert body["failures"][0] == {"model": "veo-3.1", "code": "content_policy", "jobs": 2}
    assert body["overflow"]["jobs"] == 3


def test_list_users_finds_by_email_substring(db: Database, settings: Settings) -> None:
    alice = add_user(db, settings, email="Alice.Smith@example.com").user
    add_user(db, settings, email="bob@example.com")
    add_user(db, settings, email="a_lice@example.org")
    admin = AdminService(db, settings)
    assert [u.id for u, _ in admin.list_users(q="alice.s")] == [alice.id]  # any case
    assert [u.email for u, _ in admin.list_users(q="a_l")] == ["a_lice@example.org"]  # _ is not a wildcard
    assert [u.email for u, _ in admin.list_users(q="%")] == []
    assert len(admin.list_users(q=None)) == 3


async def test_users_route_filters_by_q(make_api: Callable[..., Awaitable[ApiHarness]]) -> None:
    api = await make_api(run_runner=False)
    carol = api.user(email="carol@example.com")
    api.user(email="dave@example.com")
    body = (await api.client.get("/v1/admin/users", params={"q": "CAROL"}, headers=bearer(ADMIN_KEY))).json()
    assert [u["id"] for u in body["data"]] == [carol.user.id]
    assert body["data"][0]["credits"] == {"balance": 100, "reserved": 0}
