"""A small HTTP client for the CLI and the demo: submit, follow progress over SSE, download."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ProgressFn = Callable[[dict[str, Any]], None]


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = error.get("code", "http_error")
        super().__init__(f"{status} {self.code}: {error.get('message', body)}")


class Client:
    def __init__(self, base_url: str, api_key: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    def submit(self, model: str, inputs: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/jobs", json={"model": model, "input": inputs}, headers=headers))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def upload(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as handle:
            return self._json(self.http.post("/v1/uploads", files={"file": (path.name, handle)}))

    def events(self, job_id: str, timeout_s: float = 3600.0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-sent events of a job, resuming with Last-Event-ID if the stream drops."""
        last_id: str | None = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(30.0, read=60.0)) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._json(response)
                    event, data = "message", []
                    for line in response.iter_lines():
                        if line.startswith("id:"):
                            last_id = line[3:].strip()
                        elif line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif not line and data:
                            payload = json.loads("\n".join(data))
                            yield event, payload
                            if event == "completed":
                                return
                            event, data = "message", []
            except (httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ConnectError):
                time.sleep(1.0)
        raise TimeoutError(f"job {job_id} did not finish in {timeout_s:.0f} s")

    def wait(self, job_id: str, on_event: ProgressFn | None = None, timeout_s: float = 3600.0) -> dict[str, Any]:
        for event, payload in self.events(job_id, timeout_s):
            if on_event is not None:
                on_event({"event": event, **payload})
            if event == "completed":
                return payload.get("job") or self.job(job_id)
        return self.job(job_id)

    def download(self, url: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with httpx.stream("GET", url, timeout=60.0) as response:
            response.raise_for_status()
            with path.open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
        return path
