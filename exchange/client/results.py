"""Typed results of the SDK's main calls (:mod:`exchange.client.sdk`).

Each result is the JSON object the API answered, as a ``dict`` subclass: it indexes like the
dict it always was (``grant["id"]``), serializes with :func:`json.dumps` unchanged, and adds
typed, documented attributes for its main fields (``grant.id``, ``grant.expires_at`` as a
:class:`~datetime.datetime`). ``raw`` is a plain copy; fields a newer server adds stay
reachable by index.

    >>> grant = Grant({"id": "grant:1", "expires_at": "2026-01-01T00:00:00Z"})
    >>> grant.id, grant.expires_at.year, grant["id"]
    ('grant:1', 2026, 'grant:1')
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

if TYPE_CHECKING:
    from crypto.receipt import NodeCheck

__all__ = [
    "AccessRequest",
    "Budget",
    "Catalog",
    "Column",
    "Computation",
    "Dataset",
    "Grant",
    "Principal",
    "Result",
    "Zone",
]

T = TypeVar("T")


class Result(dict[str, Any]):
    """A JSON object the API answered, with typed attributes for its main fields."""

    __slots__ = ()

    @property
    def raw(self) -> dict[str, Any]:
        """The answer as a plain ``dict`` (every field, also those without an attribute)."""
        return dict(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


class _Field(Generic[T]):
    """A read-only attribute over one key of a :class:`Result`, converted on access."""

    def __init__(self, convert: Callable[[Any], T]) -> None:
        self.convert = convert
        self.key = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Field[T]: ...

    @overload
    def __get__(self, obj: Result, owner: type) -> T: ...

    def __get__(self, obj: Result | None, owner: type) -> _Field[T] | T:
        if obj is None:
            return self
        return self.convert(obj.get(self.key))


def _str(value: Any) -> str:
    return str(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int:
    return int(value)


def _bool(value: Any) -> bool:
    return bool(value)


def _strs(value: Any) -> list[str]:
    return [str(v) for v in value or ()]


def _time(value: Any) -> datetime:
    # RFC 3339 from the API; Python before 3.11 did not take a trailing "Z"
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _opt_time(value: Any) -> datetime | None:
    return None if value is None else _time(value)


def _decimal(value: Any) -> Decimal:
    # decimal strings on the wire (no floats in anything signed)
    return Decimal(str(value))


def _object(value: Any) -> dict[str, Any]:
    return dict(value or {})


def _rows(value: Any) -> list[list[Any]]:
    return [list(row) for row in value or ()]


class Principal(Result):
    """A registered principal: its key id (SHA-256 of the public key, hex), name and kind."""

    __slots__ = ()
    key_id = _Field(_str)
    name = _Field(_str)
    kind = _Field(_str)
    status = _Field(_str)
    created_at = _Field(_time)


class Column(Result):
    """A dataset column and its classification level (``L1`` … ``CORE``)."""

    __slots__ = ()
    name = _Field(_str)
    type = _Field(_str)
    level = _Field(_str)


class Dataset(Result):
    """A dataset in the catalog: schema, levels, a row-count band and its snapshot digest."""

    __slots__ = ()
    zone = _Field(_str)
    name = _Field(_str)
    description = _Field(_str)
    subject_column = _Field(_str)
    level = _Field(_str)
    row_count_band = _Field(_str)
    digest = _Field(_str)
    source = _Field(_str)
    created_at = _Field(_time)
    #: the provider opted out of differential privacy by default (shown, never silent)
    exact_release = _Field(_bool)
    release_note = _Field(_opt_str)

    @property
    def columns(self) -> list[Column]:
        return [Column(c) for c in self.get("columns") or ()]


class Zone(Result):
    """A zone: its owner (key id and name), public key, status and datasets."""

    __slots__ = ()
    name = _Field(_str)
    owner = _Field(_str)
    owner_name = _Field(_str)
    description = _Field(_str)
    public_key = _Field(_str)
    status = _Field(_str)
    created_at = _Field(_time)

    @property
    def datasets(self) -> list[Dataset]:
        return [Dataset(d) for d in self.get("datasets") or ()]


class Catalog(Result):
    """The catalog: every zone the caller may see, with its datasets."""

    __slots__ = ()

    @property
    def zones(self) -> list[Zone]:
        return [Zone(z) for z in self.get("zones") or ()]

    def dataset(self, zone: str, name: str) -> Dataset:
        """The dataset ``name`` of ``zone``; :class:`KeyError` naming both when it is absent."""
        for z in self.zones:
            if z.name == zone:
                for d in z.datasets:
                    if d.name == name:
                        return d
        raise KeyError(f"no dataset {name!r} in zone {zone!r} in this catalog")


class AccessRequest(Result):
    """A consumer's access request (pending, approved, rejected, …) and the grant it led to."""

    __slots__ = ()
    id = _Field(_str)
    consumer = _Field(_str)
    zone = _Field(_str)
    datasets = _Field(_strs)
    operations = _Field(_strs)
    purpose = _Field(_str)
    duration_seconds = _Field(_int)
    justification = _Field(_str)
    status = _Field(_str)
    created_at = _Field(_time)
    decided_at = _Field(_opt_time)
    decided_by = _Field(_opt_str)
    reason = _Field(_opt_str)
    grant_id = _Field(_opt_str)


class Grant(Result):
    """A grant: what a consumer may do (datasets, operations, purpose) until ``expires_at``."""

    __slots__ = ()
    id = _Field(_str)
    request_id = _Field(_str)
    consumer = _Field(_str)
    zone = _Field(_str)
    datasets = _Field(_strs)
    operations = _Field(_strs)
    purpose = _Field(_str)
    expires_at = _Field(_time)
    created_at = _Field(_time)
    status = _Field(_str)
    approved_by = _Field(_strs)
    revoked_at = _Field(_opt_time)
    revoke_reason = _Field(_opt_str)


class Budget(Result):
    """A consumer's privacy budget (ε) on one dataset in the current window."""

    __slots__ = ()
    zone = _Field(_str)
    dataset = _Field(_str)
    budget = _Field(_decimal)
    spent = _Field(_decimal)
    remaining = _Field(_decimal)
    window_start = _Field(_time)
    window_end = _Field(_time)
    dp_required = _Field(_bool)
    rules_version = _Field(_int)


class Computation(Result):
    """A released computation: the ``result`` document and its signed ``receipt`` bundle.

    Check it offline with :meth:`verify` and the log's verifier key, or save both and run
    ``zonex receipt verify RECEIPT --result RESULT --log-key log.pub`` (the receipt's
    ``result_digest`` is the SHA-256 of the result's canonical JSON)."""

    __slots__ = ()
    result = _Field(_object)
    receipt = _Field(_object)

    @property
    def columns(self) -> list[str]:
        """The result's column names (aggregate and export)."""
        return _strs(self.result.get("columns"))

    @property
    def rows(self) -> list[list[Any]]:
        """The released rows: noisy under differential privacy, masked ids on export (for a
        node-hosted dataset's export, the rows opened from their sealed box, beside the
        signed result that names their digest)."""
        return _rows(self["rows"] if "rows" in self else self.result.get("rows"))

    @property
    def level(self) -> str | None:
        """The result's classification level (the highest of its inputs)."""
        return _opt_str(self.result.get("level"))

    def verify(self, log_key: str) -> dict[str, Any]:
        """Check the receipt and the result offline against the log's verifier key (the text
        of ``log.pub``); returns the signed statement or raises
        :class:`crypto.errors.VerificationError` naming the first check that failed."""
        from crypto.note import NoteVerifier
        from crypto.receipt import verify_receipt

        statement, _ = verify_receipt(
            self.receipt, self.result, NoteVerifier.from_verifier_key(log_key.strip())
        )
        return statement

    def node_checks(self, log_key: str) -> list[NodeCheck]:
        """:meth:`verify`, then each zone's node check (:func:`crypto.receipt.check_nodes`):
        for a secure sum one per zone, hosted by the exchange (no node) or its node's signed
        contribution checked; for a computation one node ran, that node; else none. A failed
        node check raises :class:`crypto.receipt.NodeResultError`, whose ``checks`` report
        every zone."""
        from crypto.receipt import check_nodes

        return check_nodes(self.receipt, self.verify(log_key), self.result)
