"""Load benchmark of the job layer: many clients submitting and polling at once, then the ledger
checked to the credit.

    .venv/bin/python -m bench.load [--clients 50] [--duration-s 60] [--quick] [--json PATH]

The stack under test is the API process as ``cineweave up`` runs it (uvicorn on 127.0.0.1, the
runner in the same process, SQLite in WAL mode, local storage, a fresh data dir), with a **fast
fake executor** instead of Ray: the subject is the credit/job layer (admission, reservation,
runner claims, leases, settlement, polling) under concurrency, not GPU time, and the embedded Ray
stack does not fit beside 50 clients on a small machine. The executor takes a few milliseconds per
job; every 10th job fails (non-retryable, refunded) and every 15th is canceled by its client.

Each client has its own user (so the per-user limits hold as configured for the active-job cap;
the per-minute rate limit is raised for the run: 50 clients submitting for a minute are far above
5/min each). A client loops: submit, poll ``GET /v1/jobs/{id}`` every ``--poll-s`` until the job
ends, sometimes cancel. After ``--duration-s`` the clients stop submitting, finish their jobs, and
the runner drains. Then the ledger is checked exactly:

- sum of captures == sum of the succeeded jobs' prices (each job's reservation);
- sum of refunds == sum of the reservations of failed and canceled jobs;
- every job has one reservation and one settlement; nothing is still reserved;
- each user's balance == grants - captures.

Prints p50/p99 of submit and poll latency, the 5xx count and the ledger verdict, and writes JSON
(default ``bench/results/load.json``). Exits 1 if the ledger check fails or any 5xx was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import load_average

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
MODEL = "tiny-sd"
TERMINAL = {"succeeded", "failed", "canceled"}
CREDITS_PER_USER = 100_000


class FastExecutor:
    """A few milliseconds per job: stage, progress, one PNG output, done (or a planned failure)."""

    def __init__(self, storage: Any, step_s: float = 0.002) -> None:
        self.storage = storage
        self.step_s = step_s
        self.runs = 0
        self._cancel: set[str] = set()

    async def run(self, request: Any) -> AsyncIterator[Any]:
        from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProgressEvent, StageEvent

        self.runs += 1
        yield StageEvent("generating")
        for step in (1, 2, 3):
            await asyncio.sleep(self.step_s)
            if request.job_id in self._cancel:
                yield ErrorEvent("canceled", "canceled", retryable=False)
                return
            yield ProgressEvent(step, 3)
        if request.input.get("prompt", "").startswith("fail"):
            yield ErrorEvent("invalid_input", "the bench asked for a failure", retryable=False)
            return
        key = f"{request.output_prefix}0.png"
        self.storage.put_bytes(key, b"\x89PNG bench", "image/png")
        yield OutputEvent(key=key, content_type="image/png", width=64, height=64)
        yield DoneEvent({"seed": request.input.get("seed")})

    async def cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)


class Server:
    """uvicorn for ``app`` in a thread, on a socket bound to 127.0.0.1 (loopback only)."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", backlog=1024,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout_s: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index] * 1000, 2)


async def client_loop(http: Any, key: str, stop_at: float, poll_s: float, job_timeout_s: float,
                      out: dict[str, Any]) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < stop_at:
        seq = next(out["seq"])  # across all clients: every 10th job fails, every 15th is canceled
        prompt = "fail please" if seq % 10 == 0 else f"a cat {seq}"
        started = time.monotonic()
        r = await http.post("/v1/jobs", json={"model": MODEL, "input": {"prompt": prompt, "seed": seq}},
                            headers=auth)
        out["submit_s"].append(time.monotonic() - started)
        out["status"][r.status_code] = out["status"].get(r.status_code, 0) + 1
        if r.status_code != 202:
            if r.status_code == 429:  # the active-job cap: wait for a poll interval, try again
                await asyncio.sleep(poll_s)
            continue
        job_id = r.json()["id"]
        out["jobs"].append(job_id)
        cancel = seq % 15 == 0
        deadline = time.monotonic() + job_timeout_s
        while time.monotonic() < deadline:
            if cancel:
                c = await http.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
                out["status"][c.status_code] = out["status"].get(c.status_code, 0) + 1
                cancel = False
            started = time.monotonic()
            p = await http.get(f"/v1/jobs/{job_id}", headers=auth)
            out["poll_s"].append(time.monotonic() - started)
            out["status"][p.status_code] = out["status"].get(p.status_code, 0) + 1
            if p.status_code == 200 and p.json()["status"] in TERMINAL:
                break
            await asyncio.sleep(poll_s)
        else:
            out["timed_out"].append(job_id)


def check_ledger(db: Any, user_ids: list[str]) -> dict[str, Any]:
    """The exact checks of the module docstring; returns the figures and the list of violations."""
    from sqlalchemy import func, select

    from api.db.tables import Balance, Job, LedgerEntry

    problems: list[str] = []
    with db.read() as s:
        jobs = s.execute(select(Job.id, Job.status, Job.credits_reserved, Job.credits_charged,
                                Job.credits_refunded)).all()
        entries = s.execute(select(LedgerEntry.user_id, LedgerEntry.kind, LedgerEntry.amount,
                                   LedgerEntry.job_id)).all()
        balances = {b.user_id: b for b in s.execute(select(Balance)).scalars()}
        per_kind = dict(s.execute(select(LedgerEntry.kind, func.sum(LedgerEntry.amount))
                                  .group_by(LedgerEntry.kind)).all())
    by_job: dict[str, dict[str, int]] = {}
    for _user, kind, amount, job_id in entries:
        if job_id:
            by_job.setdefault(job_id, {})[kind] = by_job.get(job_id, {}).get(kind, 0) + amount
    status_count: dict[str, int] = {}
    succeeded_price = refundable = 0
    for job_id, status, reserved, charged, refunded in jobs:
        status_count[status] = status_count.get(status, 0) + 1
        moves = by_job.get(job_id, {})
        if status not in TERMINAL:
            problems.append(f"job {job_id} still {status}")
            continue
        if moves.get("reserve") != reserved:
            problems.append(f"job {job_id}: reservation {moves.get('reserve')} != price {reserved}")
        if status == "succeeded":
            succeeded_price += reserved
            if moves.get("capture") != reserved or "refund" in moves or charged != reserved:
                problems.append(f"job {job_id} succeeded but moved {moves}")
        else:
            refundable += reserved
            if moves.get("refund") != reserved or "capture" in moves or refunded != reserved:
                problems.append(f"job {job_id} {status} but moved {moves}")
    captures, refunds = per_kind.get("capture", 0), per_kind.get("refund", 0)
    if captures != succeeded_price:
        problems.append(f"captures {captures} != succeeded jobs' prices {succeeded_price}")
    if refunds != refundable:
        problems.append(f"refunds {refunds} != failed/canceled jobs' reservations {refundable}")
    grants: dict[str, int] = {}
    captured: dict[str, int] = {}
    for user, kind, amount, _job in entries:
        if kind in ("grant", "purchase", "adjust"):
            grants[user] = grants.get(user, 0) + amount
        elif kind == "capture":
            captured[user] = captured.get(user, 0) + amount
    reserved_total = 0
    for user in user_ids:
        b = balances.get(user)
        if b is None:
            problems.append(f"user {user} has no balance row")
            continue
        reserved_total += b.reserved
        if b.available != grants.get(user, 0) - captured.get(user, 0):
            problems.append(f"user {user}: balance {b.available} != grants {grants.get(user, 0)} - captures "
                            f"{captured.get(user, 0)}")
    if reserved_total:
        problems.append(f"{reserved_total} credits still reserved after the drain")
    return {"jobs": status_count, "captures": captures, "refunds": refunds, "succeeded_prices": succeeded_price,
            "failed_or_canceled_reservations": refundable, "reserved_after_drain": reserved_total,
            "ok": not problems, "problems": problems[:20]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from api.db.engine import Database
    from api.http.app import create_app
    from api.services.users import create_user
    from api.settings import Settings
    from api.storage.base import make_storage

    data_dir = Path(tempfile.mkdtemp(prefix="cineweave-load-"))
    settings = Settings(data_dir=data_dir, rate_limit_per_minute=1_000_000, runner_poll_s=args.runner_poll_s,
                        runner_concurrency=args.runner_concurrency, _env_file=None)
    storage = make_storage(settings.resolved_storage_url(), signing_secret="bench-secret",
                           public_base_url="http://127.0.0.1")
    executor = FastExecutor(storage)
    app = create_app(settings, executor, storage=storage, run_maintenance=False)
    server = Server(app)
    server.start()
    db = Database(settings)
    keys: list[str] = []
    user_ids: list[str] = []
    with db.session() as session:
        for i in range(args.clients):
            made = create_user(session, settings, f"load{i}@example.com", None, CREDITS_PER_USER)
            keys.append(made.api_key)
            user_ids.append(made.user.id)
        session.commit()
    out: dict[str, Any] = {"submit_s": [], "poll_s": [], "status": {}, "jobs": [], "timed_out": [],
                           "seq": itertools.count(1)}
    started = time.monotonic()
    stop_at = started + args.duration_s
    load_before = load_average()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=args.clients * 2)) as http:
            await asyncio.gather(*(client_loop(http, key, stop_at, args.poll_s, args.job_timeout_s, out)
                                   for key in keys))
        elapsed = time.monotonic() - started
        runner = app.state.cineweave.runner
        if runner is not None:  # nothing may stay queued or running before the ledger is read
            deadline = time.monotonic() + args.job_timeout_s
            while runner.active_job_ids and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
    finally:
        server.stop()
    ledger_check = check_ledger(db, user_ids)
    db.dispose()
    errors_5xx = sum(n for code, n in out["status"].items() if code >= 500)
    return {
        "stack": "API (uvicorn, 127.0.0.1) + runner + SQLite WAL + local storage; fast fake executor, no Ray",
        "clients": args.clients, "duration_s": round(elapsed, 1), "poll_s": args.poll_s,
        "jobs_submitted": len(out["jobs"]), "jobs_per_s": round(len(out["jobs"]) / elapsed, 1),
        "submit_ms": {"p50": percentile(out["submit_s"], 50), "p99": percentile(out["submit_s"], 99),
                      "mean": round(statistics.fmean(out["submit_s"]) * 1000, 2) if out["submit_s"] else None,
                      "n": len(out["submit_s"])},
        "poll_ms": {"p50": percentile(out["poll_s"], 50), "p99": percentile(out["poll_s"], 99),
                    "mean": round(statistics.fmean(out["poll_s"]) * 1000, 2) if out["poll_s"] else None,
                    "n": len(out["poll_s"])},
        "http_status": {str(k): v for k, v in sorted(out["status"].items())}, "errors_5xx": errors_5xx,
        "jobs_timed_out": len(out["timed_out"]), "executor_runs": executor.runs, "ledger": ledger_check,
        "machine": {"python": platform.python_version(), "cpus": _cpus(), "load_before": load_before,
                    "load_after": load_average()},
    }


def _cpus() -> int | None:
    import os

    return os.cpu_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="10 s instead of --duration-s")
    parser.add_argument("--poll-s", type=float, default=0.2, help="how often a client polls its job")
    parser.add_argument("--job-timeout-s", type=float, default=120.0)
    parser.add_argument("--runner-poll-s", type=float, default=0.05)
    parser.add_argument("--runner-concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s = 10.0
    if not 1 <= args.clients <= 500 or not 0 < args.duration_s <= 3600:
        parser.error("--clients 1..500, --duration-s up to 3600")
    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(run(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    s, p = result["submit_ms"], result["poll_ms"]
    print(f"{result['clients']} clients for {result['duration_s']} s: {result['jobs_submitted']} jobs "
          f"({result['jobs_per_s']}/s)")
    print(f"submit p50 {s['p50']} ms  p99 {s['p99']} ms  (n={s['n']})")
    print(f"poll   p50 {p['p50']} ms  p99 {p['p99']} ms  (n={p['n']})")
    print(f"5xx: {result['errors_5xx']}  statuses: {result['http_status']}  timed out: {result['jobs_timed_out']}")
    ledger = result["ledger"]
    print(f"ledger: {'exact' if ledger['ok'] else 'WRONG'}  jobs {ledger['jobs']}  captures {ledger['captures']} "
          f"= succeeded prices {ledger['succeeded_prices']}; refunds {ledger['refunds']} = failed/canceled "
          f"reservations {ledger['failed_or_canceled_reservations']}; reserved after drain "
          f"{ledger['reserved_after_drain']}")
    for problem in ledger["problems"]:
        print("  ", problem)
    print(f"load average before/after: {result['machine']['load_before']} / {result['machine']['load_after']}")
    return 0 if ledger["ok"] and result["errors_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
