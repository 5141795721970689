"""The console's event-stream client (``static/lib/api.js`` ``streamEvents``) under Node, with
``fetch`` and the back-off timer replaced by the test's: a stream that delivered events and then
ended or broke does not count toward the retry limit (only attempts in a row without an event
do). Needs ``node`` (skips with the reason without it, except under CI)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.browser import browser_required

API_JS = Path(__file__).resolve().parents[3] / "api" / "http" / "console" / "static" / "lib" / "api.js"

# attempts: each a list of SSE events to send, then how the stream ends ("end" or "break");
# the script prints what the handlers saw, the requests' Last-Event-ID and the back-offs asked for
SCRIPT = """
const [apiUrl, attempts] = [process.argv[2], JSON.parse(process.argv[3])];
globalThis.sessionStorage = { getItem: () => "cw_test_key", setItem() {}, removeItem() {} };
const waits = [];
globalThis.setTimeout = (fn, ms) => { waits.push(ms); queueMicrotask(fn); return 0; };
const lastIds = [];
let calls = 0;
globalThis.fetch = async (url, init) => {
  const attempt = attempts[Math.min(calls, attempts.length - 1)];
  calls += 1;
  lastIds.push(init.headers["Last-Event-ID"] || null);
  const enc = new TextEncoder();
  const chunks = attempt.events.map((e, i) => enc.encode(`id: ${calls * 100 + i}\\nevent: ${e}\\ndata: {}\\n\\n`));
  const body = new ReadableStream({
    pull(c) { // one chunk a read, then the end (an error only once the chunks were read: error() drops them)
      if (chunks.length) c.enqueue(chunks.shift());
      else if (attempt.end === "break") c.error(new TypeError("network error"));
      else c.close();
    },
  });
  return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
};
const { streamEvents } = await import(apiUrl);
const seen = [];
const result = await new Promise((resolve) => {
  const on = (name) => () => seen.push(name);
  streamEvents("job_1", {
    progress: on("progress"), completed: on("completed"),
    onError: (e) => resolve("error"), onEnd: () => resolve("end"),
  }, { maxRetries: 2 });
});
console.log(JSON.stringify({ result, seen, calls, lastIds, waits }));
"""


def run_stream(tmp_path: Path, attempts: list[dict[str, object]]) -> dict[str, object]:
    node = shutil.which("node")
    if node is None:
        if browser_required():
            pytest.fail("node is required here (CI) for the console's client tests", pytrace=False)
        pytest.skip("node is not installed")
    script = tmp_path / "stream.mjs"
    script.write_text(SCRIPT)
    done = subprocess.run([node, str(script), API_JS.as_uri(), json.dumps(attempts)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("end", ["end", "break"])
def test_streams_that_deliver_events_reset_the_retry_count(tmp_path: Path, end: str) -> None:
    # five streams in a row that each deliver a step and then end (or break): more than
    # maxRetries (2), but every one was working, so the client follows the job to its end
    attempts = [{"events": ["progress"], "end": end}] * 5 + [{"events": ["completed"], "end": "end"}]
    out = run_stream(tmp_path, attempts)
    assert out["result"] == "end" and out["seen"] == ["progress"] * 5 + ["completed"], out
    assert out["calls"] == 6
    assert out["lastIds"] == [None, "100", "200", "300", "400", "500"]  # each reconnect resumes after the last
    if end == "end":
        assert out["waits"] == []  # an early end after events: reconnect at once
    else:
        assert out["waits"] == [1000] * 5  # a break after events: the first back-off, every time


def test_streams_without_events_stop_after_max_retries(tmp_path: Path) -> None:
    out = run_stream(tmp_path, [{"events": [], "end": "break"}])
    assert out["result"] == "error" and out["calls"] == 3 and out["seen"] == [], out
    assert out["waits"] == [1000, 2000]
