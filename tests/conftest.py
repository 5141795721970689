"""Shared fixtures. Fixture plugins live in tests/fixtures/ (one module per concern)."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.core",
    "tests.fixtures.s3",
    "tests.fixtures.harness",
    "tests.fixtures.ray",
]
