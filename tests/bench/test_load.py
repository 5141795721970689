"""bench/load.py end to end at a tiny scale: clients, the API on loopback, the exact ledger check."""

from __future__ import annotations

import json
from pathlib import Path

from bench import load


def test_quick_load_run_checks_the_ledger_exactly(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    code = load.main(["--clients", "4", "--duration-s", "2", "--poll-s", "0.05", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result
    assert result["errors_5xx"] == 0 and result["jobs_submitted"] > 0
    ledger = result["ledger"]
    assert ledger["ok"] and ledger["reserved_after_drain"] == 0
    assert ledger["captures"] == ledger["succeeded_prices"]
    assert result["submit_ms"]["p50"] is not None and result["poll_ms"]["p99"] is not None
