"""Settings: the CINEWEAVE_ prefix, JSON lists, database URLs, per-plan limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from api import settings as settings_module
from api.settings import Plan, PlanLimits, Settings, get_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CINEWEAVE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    settings_module._cached_settings.cache_clear()
    yield
    settings_module._cached_settings.cache_clear()


def test_defaults() -> None:
    s = Settings(_env_file=None)
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert (s.max_active_jobs, s.rate_limit_per_minute, s.max_prompt_chars) == (3, 5, 500)
    assert s.content_policy_words == [] and s.output_retention_days == 0
    assert s.data_dir == Path("./var")
    assert [p.id for p in s.plans] == ["free", "starter", "creator", "studio"]
    assert [(p.one_time_credits, p.monthly_credits, p.price_usd) for p in s.plans] == [
        (100, 0, 0.0), (0, 80, 10.0), (0, 250, 31.0), (0, 500, 60.0)]
    assert (s.video_credits_per_second, s.video_1080p_multiplier) == (10.0, 1.5)


def test_env_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CINEWEAVE_MAX_ACTIVE_JOBS", "7")
    monkeypatch.setenv("CINEWEAVE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("CINEWEAVE_ADMIN_KEY", "sekrit")
    monkeypatch.setenv("MAX_ACTIVE_JOBS", "99")  # without the prefix: ignored
    s = Settings(_env_file=None)
    assert s.max_active_jobs == 7
    assert s.data_dir == tmp_path / "d"
    assert s.admin_key == "sekrit"


def test_content_policy_words_take_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CINEWEAVE_CONTENT_POLICY_WORDS", '["a","b"]')
    assert Settings(_env_file=None).content_policy_words == ["a", "b"]
    monkeypatch.setenv("CINEWEAVE_CONTENT_POLICY_WORDS", '["word", "other phrase"]')
    assert Settings(_env_file=None).content_policy_words == ["word", "other phrase"]


def test_cors_origins_take_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CINEWEAVE_CORS_ORIGINS", '["http://localhost:3000"]')
    assert Settings(_env_file=None).cors_origins == ["http://localhost:3000"]


def test_env_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CINEWEAVE_RATE_LIMIT_PER_MINUTE=12\n")
    assert Settings().rate_limit_per_minute == 12


@pytest.mark.parametrize(("given", "resolved"), [
    ("postgresql://user@host:5432/db", "postgresql+psycopg://user@host:5432/db"),
    ("postgres://user:pw@host/db", "postgresql+psycopg://user:pw@host/db"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_database_url(given: str, resolved: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CINEWEAVE_DATABASE_URL", given)
    assert Settings(_env_file=None).resolved_database_url() == resolved


def test_plain_postgres_url_builds_a_psycopg_engine() -> None:
    from api.db.engine import make_engine

    engine = make_engine(Settings(database_url="postgresql://postgres@127.0.0.1:5432/test", _env_file=None))
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    engine.dispose()


def test_default_database_and_storage_live_in_the_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "v", _env_file=None)
    assert s.resolved_database_url() == f"sqlite:///{(tmp_path / 'v' / 'cineweave.db').resolve()}"
    assert s.resolved_storage_url() == f"file://{(tmp_path / 'v' / 'storage').resolve()}"


def test_signing_secret_is_created_once(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "v", _env_file=None)
    first = s.resolved_signing_secret()
    assert len(first) == 64 and first == s.resolved_signing_secret()
    assert (tmp_path / "v" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert Settings(signing_secret="given", _env_file=None).resolved_signing_secret() == "given"


def test_per_plan_limit_overrides() -> None:
    s = Settings(_env_file=None, max_active_jobs=2, rate_limit_per_minute=4, max_prompt_chars=100)
    assert s.limits_for("free") == (2, 4, 100)
    assert s.limits_for("studio") == (6, 20, 100)     # studio overrides two of the three
    assert s.limits_for("no-such-plan") == (2, 4, 100)


def test_plans_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CINEWEAVE_PLANS", '[{"id": "pro", "name": "Pro", "monthly_credits": 900, '
                                          '"limits": {"max_prompt_chars": 2000}}]')
    s = Settings(_env_file=None)
    assert [p.id for p in s.plans] == ["pro"]
    assert s.plan("pro").monthly_credits == 900
    assert s.limits_for("pro") == (3, 5, 2000)
    with pytest.raises(KeyError):
        s.plan("free")


def test_plan_limits_zero_is_an_override_not_a_default() -> None:
    s = Settings(_env_file=None, plans=[Plan(id="locked", name="L", limits=PlanLimits(max_active_jobs=0))])
    assert s.limits_for("locked")[0] == 0


def test_get_settings_reads_the_env_when_called_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CINEWEAVE_PORT", "9001")
    assert get_settings(fresh=True).port == 9001
    monkeypatch.setenv("CINEWEAVE_PORT", "9002")
    assert get_settings().port == 9001            # cached
    assert get_settings(fresh=True).port == 9002  # rebuilt
