"""The exchange's error tree. One stable ``code`` and HTTP ``status`` per class.

Domain code raises these; the API maps them to RFC 9457 problem+json in one place and the
CLI prints them as one line. Foreign exceptions are translated at the adapter edge.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ZonexError(Exception):
    """Base class. ``detail`` is safe to show to the caller."""

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    #: set where the domain has already put this refusal on the ledger (``access.denied``,
    #: ``he.score_refused`` ...), so the API does not record it a second time
    ledgered: bool = False

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class InvalidInputError(ZonexError):
    code = "invalid_input"
    status = 422
    title = "Invalid input"


class AuthenticationError(ZonexError):
    """Any failure to authenticate a request. The caller sees one collapsed answer; the precise
    ``reason`` goes to the server log and the ledger."""

    code = "verification_failed"
    status = 401
    title = "Request signature could not be verified"

    def __init__(self, reason: str, keyid: str | None = None, *, signed: bool = False) -> None:
        super().__init__(self.title)
        self.reason = reason
        self.keyid = keyid
        if signed and reason == "suspended":
            # the caller's own fresh signature verified: it holds the key, so it may learn that
            # the key is suspended (never told to anyone who did not sign with it)
            self.detail = "your key is suspended; ask the operator to reinstate it"
            self.extra["reason"] = reason
        elif signed and reason == "pending":
            self.detail = "your node key awaits the operator's approval: zonex node approve KEY_ID"
            self.extra["reason"] = reason


class ForbiddenError(ZonexError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class DeniedError(ForbiddenError):
    """A policy decision denied the call. ``reason`` is a stable denial code, never policy text."""

    code = "denied"
    title = "Denied by policy"

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or f"denied: {reason}", reason=reason)
        self.reason = reason


class NotFoundError(ZonexError):
    code = "not_found"
    status = 404
    title = "Not found"


class ConflictError(ZonexError):
    code = "conflict"
    status = 409
    title = "Conflict"


class PayloadTooLargeError(ZonexError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class UnsupportedMediaTypeError(ZonexError):
    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"


class BudgetExhaustedError(ZonexError):
    code = "budget_exhausted"
    status = 429
    title = "Privacy budget exhausted"


class ThrottledError(ZonexError):
    """The caller's computations are throttled after an incident (docs/incidents.md) until the
    time its ``principal.throttled`` entry names."""

    code = "throttled"
    status = 429
    title = "Throttled"


class LedgerError(ZonexError):
    """The ledger could not record evidence; the exchange refuses to act without it."""

    code = "ledger_unavailable"
    status = 503
    title = "Ledger unavailable"


class UnavailableError(ZonexError):
    """A store the exchange needs before it may act (the nonce record of a request) could not
    be written; nothing was done. The caller may retry the same request."""

    code = "unavailable"
    status = 503
    title = "Service unavailable"


class ZoneUnavailableError(ZonexError):
    """The zone's node is offline or did not finish the task in time; nothing was released and
    nothing was charged. The caller may retry once the zone is back (the catalog shows it)."""

    code = "zone_unavailable"
    status = 503
    title = "Zone unavailable"


class KeyFileError(ZonexError):
    code = "key_file"
    status = 400
    title = "Key file problem"


class ConfigurationError(ZonexError):
    code = "configuration"
    status = 500
    title = "Configuration problem"


def all_error_classes() -> list[type[ZonexError]]:
    """Every class in the tree (tests check each has a status and a unique code)."""
    seen: list[type[ZonexError]] = []
    stack: list[type[ZonexError]] = [ZonexError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen
