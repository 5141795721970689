"""The one seam between the job layer and compute.

The runner hands an :class:`ExecutionRequest` to an :class:`Executor` and consumes the events it
yields until a :class:`DoneEvent` or :class:`ErrorEvent`. Implementations: the Ray Serve executor
(``serve.executor``), the overflow adapters (``serve.fallback``), the router that picks between
them, and the scripted fake used in tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from api.core.events import ExecutorEvent

REATTACH_KEY = "reattach_route"
"""``ExecutionRequest.resume[REATTACH_KEY]``: where an earlier attempt's run still goes on (or is
done), e.g. ``"local"``, when the job was taken back from a runner that stopped or vanished; the
router then sends this attempt there to attach, rather than routing it afresh."""


@dataclass(frozen=True)
class ExecutionRequest:
    job_id: str
    user_id: str
    model: str
    kind: str
    task: str
    input: dict[str, Any]
    attempt: int = 1
    output_prefix: str = ""
    resume: dict[str, Any] = field(default_factory=dict)
    """State the executor left on an earlier attempt (e.g. a training checkpoint key)."""
    queued_behind: int = 0
    """Jobs of the same model the runner claimed right behind this one (a replica may batch them)."""
    # ``job_id`` and ``attempt`` are what a replica attaches by: a reclaimed job's next attempt
    # joins the run an earlier attempt started there (see serve.generator).


@runtime_checkable
class Executor(Protocol):
    def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        """Run the job, yielding events; the last one is a DoneEvent or an ErrorEvent."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Ask the running job to stop; the run then ends with an ErrorEvent code ``canceled``.

        The only way to stop work: a consumer that closes the stream of :meth:`run` early (shutdown,
        a lost lease) just stops listening, and an executor whose work outlives its caller (the
        Ray replicas) keeps it for the job's next attempt to attach to.
        """
        ...


@runtime_checkable
class ProviderWebhookReceiver(Protocol):
    """An executor that takes provider callbacks (``POST /v1/webhooks/{provider}``).

    Returns True when the callback was verified and accepted (duplicates included), False when
    the signature or timestamp is bad (the route answers 401 and nothing changes).
    """

    async def handle_webhook(self, provider: str, headers: dict[str, str], body: bytes) -> bool: ...
