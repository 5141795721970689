"""Schemathesis over the pipeline operations only (the app-wide run may spend its time budget
before reaching them): no request, valid or not, gets a 5xx. Bounded examples per operation."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from schemathesis.generation import GenerationMode

from api.http.app import create_app
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user

EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}


@pytest.mark.slow
def test_no_server_errors_on_pipeline_routes(settings: Settings, storage: LocalStorage, live_server: Any) -> None:
    s = settings.model_copy(update={"max_active_jobs": 10_000, "rate_limit_per_minute": 100_000,
                                    "webhook_max_attempts": 1})
    app = create_app(s, FakeExecutor(storage=storage), storage=storage, run_maintenance=False)
    srv = live_server(app)
    user = add_user(app.state.cineweave.db, s, credits=10_000_000)
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    operations = [op for op in (r.ok() for r in schema.get_all_operations())
                  if op.path.startswith("/v1/pipelines") and not op.path.endswith("/events")]
    assert len(operations) == 5
    failures: list[str] = []
    calls: list[int] = []

    def checker(operation: Any, mode: GenerationMode, examples: int) -> Any:
        @hsettings(max_examples=examples, deadline=None, database=None, derandomize=True,
                   phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            calls.append(1)
            response = case.call(base_url=srv.url, headers={"Authorization": f"Bearer {user.api_key}"},
                                 timeout=15)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} ({mode}): {response.status_code} "
                                f"{response.text[:200]}\n  {case.as_curl_command()}")
        return check

    for operation in operations:
        for mode, examples in EXAMPLES.items():
            checker(operation, mode, examples)()
    assert len(calls) >= 100
    assert not failures, "\n".join(failures[:10])
