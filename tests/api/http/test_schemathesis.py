"""Schemathesis over the app's own OpenAPI schema, against a real server: no request, valid or not,
gets a 5xx. Bounded: a few dozen examples per operation and mode."""

from __future__ import annotations

import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from api.http.app import create_app
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import ADMIN_KEY, add_user

EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 12}
BUDGET_S = 150.0  # stop starting new operations after this long (the run stays bounded on a slow machine)


@pytest.mark.slow
def test_no_server_errors(settings: Settings, storage: LocalStorage, live_server: Any) -> None:
    s = settings.model_copy(update={"max_active_jobs": 10_000, "rate_limit_per_minute": 100_000,
                                    "webhook_max_attempts": 1})
    app = create_app(s, FakeExecutor(storage=storage), storage=storage, run_maintenance=False)
    srv = live_server(app)
    user = add_user(app.state.cineweave.db, s, credits=10_000_000)
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    failures: list[str] = []
    calls: list[int] = []
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30

    def checker(operation: Any, key: str, mode: GenerationMode, examples: int) -> Any:
        @hsettings(max_examples=examples, deadline=None, database=None, derandomize=True,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            calls.append(1)
            response = case.call(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=15)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} ({mode}): {response.status_code} "
                                f"{response.text[:200]}\n  {case.as_curl_command()}")
        return check

    for operation in operations:
        key = ADMIN_KEY if operation.path.startswith("/v1/admin") else user.api_key
        for mode, examples in EXAMPLES.items():
            if time.monotonic() - started > BUDGET_S:
                break
            try:
                checker(operation, key, mode, examples)()
            except Unsatisfiable:
                # nothing to get wrong (no parameters, no body): no negative case exists
                assert mode is GenerationMode.NEGATIVE, operation.path
    assert len(calls) >= 300, f"only {len(calls)} requests were made"
    assert not failures, "\n".join(failures[:10])
