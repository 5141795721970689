"""The messages that cross from the API process (``RayExecutor``) to a replica, typed and versioned.

Rolling upgrades run an older API beside a newer replica (and the other way round) for a while, so
every message carries a version ``v`` and ignores fields it does not know: a newer sender may add
fields freely; renaming or removing one needs a new ``v`` that readers handle. The events going back
are ``api.core.events`` dicts (see ``event_to_wire`` / ``event_from_dict`` there).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

REQUEST_VERSION = 1


class ReplicaRequest(BaseModel):
    """One attempt of one job, as a generator or trainer replica receives it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = REQUEST_VERSION
    job_id: str
    attempt: int = 1
    user_id: str = ""
    model: str = ""
    task: str = ""
    input: dict[str, Any] = Field(default_factory=dict)
    output_prefix: str = ""
    adapter_set: str = ""
    """The LoRA set (``serve.generator.adapter_set_id``), also the multiplexed model id; ``""``: none."""
    resume: dict[str, Any] = Field(default_factory=dict)
    queued_behind: int = Field(default=0, ge=0)
    """How many more requests for this model the sender is about to send right after this one (it
    claimed them together): the replica's batch waits for them (at most the batch wait). An older
    sender leaves it 0: the replica then waits only for requests it sees arriving."""
    stream_batches: bool = False
    """The sender reads :data:`EVENTS_ITEM` stream items (see :func:`pack_events`): the replica may
    send the events it has ready together, as one item. An older sender leaves it False and gets
    one event per item; an older replica ignores it."""


EVENTS_ITEM = "events"
"""The ``type`` of a stream item that carries several events, in order (``{"type": "events", "v": 1,
"events": [...]}``). Each item of a Serve stream costs both ends ~1.5–2 ms of Python on a loaded
host; a run's output, done and the stream's end are ready at the same moment."""


def pack_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """One stream item for ``events`` (wire dicts): the event itself when there is one."""
    return events[0] if len(events) == 1 else {"type": EVENTS_ITEM, "v": 1, "events": list(events)}


def unpack_events(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of one stream item, in order (a plain event is a list of one)."""
    if item.get("type") == EVENTS_ITEM:
        return [e for e in item.get("events") or [] if isinstance(e, dict)]
    return [item]


RESULT_NAME = "result.json"


class ResultRecord(BaseModel):
    """What a replica stores beside a finished job's outputs (``{output_prefix}result.json``).

    Written after the outputs are uploaded, so its presence means the work is done: a reclaimed
    attempt that lands on another replica, or on this one after it restarted, collects it instead of
    running the pipeline again.
    """

    model_config = ConfigDict(extra="ignore")

    v: int = 1
    job_id: str
    attempt: int = 1
    outputs: list[dict[str, Any]] = Field(default_factory=list)
    """``api.core.events.OutputEvent`` dicts, in order."""
    result: dict[str, Any] = Field(default_factory=dict)
    """The ``DoneEvent`` result."""
