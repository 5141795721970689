"""One settings class for the whole stack (prefix ``CINEWEAVE_``), built by :func:`get_settings`.

Nothing reads the environment at import time: call ``get_settings()`` (or build ``Settings(...)``
directly in tests) and pass the object down.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlanLimits(BaseModel):
    """Per-plan overrides of the global limits; ``None`` means "use the global setting"."""

    max_active_jobs: int | None = None
    rate_limit_per_minute: int | None = None
    max_prompt_chars: int | None = None


class Plan(BaseModel):
    id: str
    name: str
    monthly_credits: int = 0
    one_time_credits: int = 0
    price_usd: float = 0.0
    limits: PlanLimits = PlanLimits()


def default_plans() -> list[Plan]:
    return [
        Plan(id="free", name="Free", one_time_credits=100),
        Plan(id="starter", name="Starter", monthly_credits=80, price_usd=10),
        Plan(id="creator", name="Creator", monthly_credits=250, price_usd=31),
        Plan(id="studio", name="Studio", monthly_credits=500, price_usd=60,
             limits=PlanLimits(max_active_jobs=6, rate_limit_per_minute=20)),
    ]


class CreditPack(BaseModel):
    """A one-off credit pack sold through Stripe Checkout (mode ``payment``)."""

    id: str = Field(min_length=1, max_length=64)
    credits: int = Field(gt=0)
    stripe_price_id: str = Field(min_length=1)


# JWS algorithms an identity provider's JWKS (public keys) can verify; HS* (a shared secret) and
# "none" are never accepted: an HS256 token "signed" with a public key must not verify
ASYMMETRIC_JWT_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                       "ES256", "ES384", "ES512", "EdDSA"})


class AdminClaim(BaseModel):
    """The claim that makes a token's bearer an admin: ``claim`` (a dotted path such as
    ``app_metadata.role``) equals ``value``, or is a list holding it."""

    claim: str = Field(min_length=1)
    value: str | int | bool


class JwtIssuer(BaseModel):
    """An app's identity provider whose JWTs sign end users in (Clerk, Supabase, any OIDC issuer)."""

    issuer: str = Field(min_length=1)  # the exact ``iss`` of its tokens
    jwks_url: str = Field(pattern=r"^https?://")
    audience: list[str] = Field(min_length=1)  # the token's ``aud`` must name one of these
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    admin_claim: AdminClaim | None = None  # None: no token of this issuer is ever an admin
    email_claim: str = "email"
    # the token's ``azp`` must be one of these when set (Clerk: your app's origins)
    authorized_parties: list[str] = Field(default_factory=list)
    default_plan: str | None = None  # a new user's plan (None: Settings.default_plan)

    @field_validator("audience", mode="before")
    @classmethod
    def _one_audience(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _asymmetric_only(self) -> JwtIssuer:
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_JWT_ALGORITHMS]
        if bad:
            raise ValueError(f"issuer {self.issuer}: algorithms {bad} are not allowed; a JWKS issuer takes "
                             f"only {sorted(ASYMMETRIC_JWT_ALGORITHMS)}")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CINEWEAVE_", env_file=".env", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None
    storage_url: str | None = None
    admin_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    cors_origins: list[str] = Field(default_factory=list)
    signing_secret: str | None = None

    # limits (global; plans may override)
    max_active_jobs: int = 3
    rate_limit_per_minute: int = 5
    max_prompt_chars: int = 500
    content_policy_words: list[str] = Field(default_factory=list)
    plans: list[Plan] = Field(default_factory=default_plans)
    default_plan: str = "free"
    # Job.priority a plan's submissions get (the runner claims higher first; plans not listed: 0)
    plan_priority: dict[str, int] = Field(
        default_factory=lambda: {"free": 0, "starter": 1, "creator": 2, "studio": 3})
    # teams: how long an invitation's token can be accepted (api/services/teams.py)
    team_invitation_ttl_s: float = Field(default=7 * 86400.0, gt=0)

    # pricing (the model spec may override per model)
    video_credits_per_second: float = 10.0
    video_1080p_multiplier: float = 1.5
    image_credits: float = 1.0
    training_credits_per_1000_steps: float = 20.0

    # retention and runner
    output_retention_days: int = 0
    url_ttl_s: int = 3600
    runner_enabled: bool = True
    runner_concurrency: int = 32
    # only the safety net: the runner is woken (notify) when a job is queued, due or a slot frees
    runner_poll_s: float = 5.0
    lease_s: float = 30.0
    # SQLite's busy timeout for writes under a lease (the runner's): well below the lease, so a
    # blocked write fails (and is retried) long before the lease runs out.
    # None: min(5 s, lease_s / 4); a set value must be <= lease_s / 4.
    sqlite_busy_timeout_s: float | None = None
    max_attempts: int = 3
    # pipelines: at most this many steps in one (POST /v1/pipelines; api/core/pipelines.py)
    pipeline_max_steps: int = Field(default=8, ge=1, le=64)
    retry_backoff_s: float = 2.0
    stuck_job_s: float = 3600.0
    maintenance_interval_s: float = 300.0
    webhook_max_attempts: int = 5
    webhook_timeout_s: float = 10.0
    webhook_backoff_s: float = 1.0
    # the webhook outbox: a claimed row is held this long (at least 3 × the timeout) before another
    # process may take it; idle deliverers poll this often (they are woken on enqueue anyway); rows
    # claimed per round; delivered/failed rows are kept this long, pruned this often
    webhook_claim_s: float = 60.0
    webhook_poll_s: float = 5.0
    webhook_batch: int = 16
    webhook_retention_s: float = 7 * 86400.0
    webhook_prune_interval_s: float = 3600.0
    # an SSE stream re-reads the event table at least this often even when no signal woke it
    sse_poll_s: float = 1.0
    # queue position and ETA: how many of a model's recent succeeded jobs the run-time estimate is
    # the median of, how long that estimate is cached, and how many jobs of one model run at
    # once (None: min(runner_concurrency, the spec's serving.max_replicas))
    queue_eta_samples: int = Field(default=20, ge=1, le=1000)
    queue_eta_cache_s: float = Field(default=10.0, ge=0)
    queue_slots_per_model: int | None = Field(default=None, ge=1)

    # models
    models_dir: Path | None = None
    tiny_models_dir: Path | None = None
    # which models the shipped presets (models/presets/*.yaml) are seeded with: "tiny" (the
    # embedded stack and CI) or "production" (sdxl, wan2.1-i2v-14b-480p); api/services/presets.py
    preset_profile: str = Field(default="tiny", pattern="^(tiny|production)$")
    ray_address: str | None = None
    # tests only: a directory through which tests hold a generation at a step until they release
    # it (serve.testhooks); None (the default) turns the hook off. Never set in production.
    test_hooks_dir: str | None = None
    # `cineweave up` stopping its own Ray: how long it waits for the replicas' queued and running
    # generations to finish (and store their results) before shutting Serve down
    replica_drain_s: float = 120.0
    # how many LoRA weight files a generator replica keeps on its disk (least recently used go)
    lora_cache_entries: int = Field(default=64, ge=1)
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    # overflow providers
    overflow_enabled: bool = True
    replicate_api_token: str | None = None
    replicate_base_url: str = "https://api.replicate.com/v1"
    replicate_webhook_secret: str | None = None
    replicate_cost_per_second_usd: float = 0.50
    # the Replicate-shaped API (/replicate/v1): every catalog model is "{replicate_owner}/{id}"
    replicate_owner: str = Field(default="cineweave", pattern=r"^[a-z0-9][a-z0-9_-]{0,38}$")
    # Cancel-After deadlines: the watcher re-reads the earliest at least this often (other
    # processes' submissions; this process's wake it at once)
    deadline_poll_s: float = Field(default=5.0, gt=0)
    # the OpenAI-shaped API (/openai/v1): how long a synchronous images request holds for its job
    # (as Prefer: wait, 60 s); the model a request without one gets (None: "model" is required)
    openai_wait_s: float = Field(default=60.0, gt=0, le=600)
    openai_default_image_model: str | None = None
    openai_default_video_model: str | None = None
    gemini_api_key: str | None = None
    gemini_base_url: str = "https://generativelanguage.googleapis.com"
    veo_cost_per_second_usd: float = 0.40
    provider_timeout_s: float = 900.0
    provider_poll_s: float = 5.0

    # upload limits
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000
    max_upload_files: int = 30
    # ZIP uploads: total uncompressed bytes of all members (the central directory is checked, then
    # enforced while reading, since headers can lie)
    max_upload_zip_bytes: int = 200 * 1024 * 1024
    # one upload request (all its files): refused from Content-Length, or as soon as the stream passes it
    max_upload_request_bytes: int = 200 * 1024 * 1024
    # upload requests this process reads at once (each may hold max_upload_request_bytes in memory);
    # one more is answered 429 with Retry-After: upload_retry_after_s
    max_concurrent_uploads: int = 4
    upload_retry_after_s: int = 5
    # the whole upload body must arrive within this (a slow client cannot hold a slot for ever)
    upload_read_timeout_s: float = 300.0

    # outbound requests (image URLs, client webhooks, provider downloads): public addresses only,
    # unless a host name or a network (CIDR) is allow-listed here (development and tests)
    egress_allow_hosts: list[str] = Field(default_factory=list)
    egress_allow_networks: list[str] = Field(default_factory=list)
    egress_max_redirects: int = 3
    egress_timeout_s: float = 20.0

    # billing with Stripe (README "Billing with Stripe"): the secret API key, the webhook endpoint's
    # signing secret and timestamp tolerance, the API base (tests: a fake on loopback), where
    # Checkout returns to, plan id -> Stripe price id, and the credit packs on sale
    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_webhook_tolerance_s: int = Field(default=300, ge=1, le=3600)
    stripe_api_base: str | None = None
    stripe_success_url: str = "http://127.0.0.1:8000/billing/success?session_id={CHECKOUT_SESSION_ID}"
    stripe_cancel_url: str = "http://127.0.0.1:8000/billing/canceled"
    stripe_portal_return_url: str = "http://127.0.0.1:8000/billing"
    stripe_plan_prices: dict[str, str] = Field(default_factory=dict)
    credit_packs: list[CreditPack] = Field(default_factory=list)
    # plan credits of this period (YYYY-MM) and later expire (one month of rollover); earlier plan
    # grants were made before expiry existed and never expire (set it to the month you upgrade in)
    credit_expiry_from: str = Field(default="2026-12", pattern=r"^\d{4}-(0[1-9]|1[0-2])$")

    # end users signed in by the app's identity provider (JSON list of JwtIssuer; README "Signing in
    # end users (JWT)"); clock leeway for exp/nbf; how long a JWKS is kept; an unknown kid refetches
    # it at most once per jwks_refetch_s; the JWKS request's timeout
    jwt_issuers: list[JwtIssuer] = Field(default_factory=list)
    jwt_leeway_s: float = Field(default=30.0, ge=0, le=300)
    jwks_cache_s: float = Field(default=300.0, gt=0)
    jwks_refetch_s: float = Field(default=30.0, ge=0)
    jwks_timeout_s: float = Field(default=5.0, gt=0, le=60)

    # /metrics: when set, scrapes must send ``Authorization: Bearer <metrics_token>``
    metrics_token: str | None = None
    # how often /metrics' database and cluster gauges are refreshed in the background (seconds)
    metrics_refresh_s: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _busy_timeout_below_lease(self) -> Settings:
        if self.sqlite_busy_timeout_s is not None and not 0 < self.sqlite_busy_timeout_s <= self.lease_s / 4:
            raise ValueError(f"sqlite_busy_timeout_s ({self.sqlite_busy_timeout_s}) must be > 0 and at most "
                             f"lease_s / 4 ({self.lease_s / 4:g}): a blocked write must give up long before "
                             "the lease runs out")
        return self

    def resolved_sqlite_busy_timeout_s(self) -> float:
        if self.sqlite_busy_timeout_s is not None:
            return min(self.sqlite_busy_timeout_s, self.lease_s / 4)
        return min(5.0, self.lease_s / 4)

    def resolved_database_url(self) -> str:
        """SQLAlchemy URL; a plain ``postgresql://`` URL is mapped to the psycopg 3 driver."""
        url = self.database_url or f"sqlite:///{(self.data_dir / 'cineweave.db').resolve()}"
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain):]
        return url

    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.data_dir / 'storage').resolve()}"

    def resolved_signing_secret(self) -> str:
        """The HMAC secret for local signed URLs: configured, or created once in the data dir."""
        if self.signing_secret:
            return self.signing_secret
        path = self.data_dir / "signing.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def plan(self, plan_id: str) -> Plan:
        for plan in self.plans:
            if plan.id == plan_id:
                return plan
        raise KeyError(plan_id)

    def limits_for(self, plan_id: str) -> tuple[int, int, int]:
        """(max_active_jobs, rate_limit_per_minute, max_prompt_chars) for a plan."""
        try:
            overrides = self.plan(plan_id).limits
        except KeyError:
            overrides = PlanLimits()
        return (
            overrides.max_active_jobs if overrides.max_active_jobs is not None else self.max_active_jobs,
            overrides.rate_limit_per_minute
            if overrides.rate_limit_per_minute is not None else self.rate_limit_per_minute,
            overrides.max_prompt_chars if overrides.max_prompt_chars is not None else self.max_prompt_chars,
        )


@lru_cache(maxsize=1)
def _cached_settings() -> Settings:
    return Settings()


def get_settings(fresh: bool = False) -> Settings:
    """The process's settings, read from the environment on first call (or every call if fresh)."""
    if fresh:
        _cached_settings.cache_clear()
    return _cached_settings()


__all__ = ["AdminClaim", "JwtIssuer", "Plan", "PlanLimits", "Settings", "default_plans", "get_settings"]
