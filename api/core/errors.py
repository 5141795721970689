"""Errors with stable codes. The HTTP layer maps them to ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any


class CineWeaveError(Exception):
    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None, *, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code:
            self.code = code
        if status:
            self.status = status

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidInput(CineWeaveError):
    code, status = "invalid_input", 422


class ContentPolicy(CineWeaveError):
    code, status = "content_policy", 422


class InsufficientCredits(CineWeaveError):
    code, status = "insufficient_credits", 402


class AccountInDebt(CineWeaveError):
    """A refund or dispute took back credits that were already spent: no new jobs until paid back."""

    code, status = "account_in_debt", 402


class RateLimited(CineWeaveError):
    code, status = "rate_limited", 429


class ConcurrencyLimit(CineWeaveError):
    code, status = "concurrency_limit", 429


class NotFound(CineWeaveError):
    code, status = "not_found", 404


class Unauthorized(CineWeaveError):
    code, status = "unauthorized", 401


class Forbidden(CineWeaveError):
    code, status = "forbidden", 403


class Conflict(CineWeaveError):
    code, status = "conflict", 409


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"


class InvalidTransition(CineWeaveError):
    """A job state change the state machine does not allow (a programming error, not user input)."""

    code, status = "invalid_transition", 409


class LedgerError(CineWeaveError):
    code, status = "ledger_error", 409
