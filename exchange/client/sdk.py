"""Python client for the zonex API. Signs every request (RFC 9421) with the caller's key.

    from exchange.client.sdk import Client

    with Client("https://exchange.example", "bank.key") as c:
        for zone in c.catalog().zones:
            print(zone.name, [d.name for d in zone.datasets])
        req = c.request_access("tax", ["companies"], ["aggregate"], "credit-assessment",
                               duration_seconds=7 * 86400, justification="credit line review")
        # ... once the provider approved:
        out = c.aggregate("tax", "SELECT district, COUNT(*) FROM companies GROUP BY district",
                          "credit-assessment")
        print(out.columns, out.rows, out.receipt["type"])

The main calls return typed results (:mod:`exchange.client.results`): dicts with attributes.
A refusal raises :class:`ApiError` carrying the server's RFC 9457 problem (``status``,
``code``, ``detail``, ``body``).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Generator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from os import PathLike
from pathlib import Path
from typing import IO, Any

import httpx

from crypto.encoding import b64_encode, b64url_encode
from crypto.envelope import sign_envelope
from crypto.errors import EncodingError
from crypto.httpsig import sign_request
from crypto.keys import SigningKey, VerifyKey
from crypto.note import Checkpoint
from crypto.tiles import entries_path, split_entry_bundle, tile_path
from exchange.client.results import (
    AccessRequest,
    Budget,
    Catalog,
    Computation,
    Dataset,
    Grant,
    Principal,
    Zone,
)
from exchange.domain import APPROVAL_TYPE, approval_payload
from exchange.keyfile import load_private_key

__all__ = [
    "AccessRequest",
    "ApiError",
    "Budget",
    "Catalog",
    "Client",
    "Computation",
    "Dataset",
    "Grant",
    "Principal",
    "ScoreRefusedError",
    "Zone",
    "open_export",
]

MEDIA_TYPES = {".csv": "text/csv", ".parquet": "application/vnd.apache.parquet"}


class ApiError(Exception):
    """The server answered with a problem+json (or another error).

    try:
        c.aggregate("tax", sql, "credit-assessment")
    except ApiError as exc:
        print(exc.status, exc.code, exc.reason, exc.detail)  # 422 invalid_input dp_required
        for field in exc.errors:                             # body validation, per field
            print(field["loc"], field["msg"])
    """

    def __init__(self, status: int, code: str, title: str, detail: str, body: Any) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.body = body

    @property
    def reason(self) -> str | None:
        """The stable refusal code within ``code`` (``not_granted``, ``dp_required``, ...)."""
        value = self.body.get("reason") if isinstance(self.body, dict) else None
        return value if isinstance(value, str) else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        """On a 422 from body validation: ``{"loc": [...], "msg": ...}`` per wrong field."""
        value = self.body.get("errors") if isinstance(self.body, dict) else None
        return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


class ScoreRefusedError(ApiError):
    """``he_score`` refused some of the ids asked (no live consent, or no single complete row).

    The exchange names them by position in the request and by count only, never by anything
    derived from the ids: ``positions`` (the first 10,000 at most) and ``count`` (exact)."""

    def __init__(self, error: ApiError, positions: list[int], count: int) -> None:
        super().__init__(error.status, error.code, error.title, error.detail, error.body)
        self.positions = positions
        self.count = count

    @classmethod
    def from_error(cls, error: ApiError, offset: int = 0) -> ScoreRefusedError:
        """The refusal in ``error``'s problem, its positions shifted by ``offset``."""
        listed = str(error.body.get("refused_positions", ""))
        positions = [offset + int(p) for p in listed.split(",") if p.isdigit()]
        return cls(error, positions, int(error.body.get("refused_count", len(positions))))


class SignatureAuth(httpx.Auth):
    """httpx auth that signs each request with Ed25519 (RFC 9421 + RFC 9530 Content-Digest)."""

    requires_request_body = True

    def __init__(self, key: SigningKey) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        headers = sign_request(
            request.method,
            str(request.url),
            request.headers,
            request.content,
            self.key,
            created=int(time.time()),
            nonce=secrets.token_urlsafe(18),
        )
        request.headers.update(headers)
        yield request


def raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    raise ApiError(
        response.status_code,
        str(body.get("code", "http_error")),
        str(body.get("title", response.reason_phrase)),
        str(body.get("detail", response.text[:200])),
        body,
    )


class Client:
    """A signed session with one exchange.

    ``key`` is the caller's private key: a path to its PEM file (``str`` or ``Path``, as
    written by ``zonex key new``; mode 0600) or a loaded :class:`~crypto.keys.SigningKey`. A
    missing, public, unreadable or group/world-readable key file raises
    :class:`~exchange.errors.KeyFileError` naming the file and what to do.

        with Client("http://127.0.0.1:8000", "bank.key") as c:
            me = c.whoami()
            print(me.name, me.key_id)
            for grant in c.grants():
                print(grant.id, grant.datasets, grant.expires_at)

    Every request is signed (RFC 9421, see docs/wire-formats-http.md); the server answers a
    refusal with a problem document, raised here as :class:`ApiError`.
    """

    def __init__(
        self,
        base_url: str,
        key: SigningKey | str | PathLike[str],
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(key, SigningKey):
            if not isinstance(key, (str, PathLike)):
                raise TypeError(
                    f"key must be a path to a private key file or a SigningKey, not "
                    f"{type(key).__name__}"
                )
            key = load_private_key(key)
        self.key = key
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            auth=SignatureAuth(key),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a signed request and return the decoded JSON answer (any route, for calls
        without a method here); raises :class:`ApiError` on a refusal."""
        response = self._http.request(method, path, **kwargs)
        raise_for_problem(response)
        return response.json()

    # principals
    def whoami(self) -> Principal:
        """The principal this client's key belongs to."""
        return Principal(self.request("GET", "/v1/principals/me"))

    def register_principal(
        self,
        name: str,
        kind: str,
        public_key: VerifyKey,
        *,
        jurisdiction: str | None = None,
        ciio: bool = False,
    ) -> dict[str, Any]:
        """Register a principal (operator). ``jurisdiction``: ISO 3166-1 alpha-2 (default: the
        operator's); ``ciio``: a critical information infrastructure operator."""
        body: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "public_key": b64url_encode(public_key.raw),
        }
        if jurisdiction is not None:
            body["jurisdiction"] = jurisdiction
        if ciio:
            body["ciio"] = True
        result: dict[str, Any] = self.request("POST", "/v1/principals", json=body)
        return result

    def list_principals(self) -> list[Principal]:
        return [Principal(p) for p in self.request("GET", "/v1/principals")]

    def set_principal_status(self, key_id: str, status: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/principals/{key_id}/status", json={"status": status}
        )
        return result

    def approve_reinstatement(self, key_id: str) -> dict[str, Any]:
        """The second person's approval (an auditor) before the operator reinstates a principal
        the monitor suspended."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/principals/{key_id}/reinstatement-approvals"
        )
        return result

    # incidents
    def open_incident(
        self,
        detector: str,
        severity: str,
        response: str,
        first_seq: int,
        last_seq: int,
        *,
        principal: str | None = None,
        zone: str | None = None,
        throttle_seconds: int | None = None,
    ) -> dict[str, Any]:
        """Open an incident with its response: ``alert``, ``throttle`` or ``suspend`` (the
        monitor, the operator)."""
        body: dict[str, Any] = {
            "detector": detector,
            "severity": severity,
            "response": response,
            "first_seq": first_seq,
            "last_seq": last_seq,
        }
        for name, value in (
            ("principal", principal),
            ("zone", zone),
            ("throttle_seconds", throttle_seconds),
        ):
            if value is not None:
                body[name] = value
        result: dict[str, Any] = self.request("POST", "/v1/incidents", json=body)
        return result

    def incidents(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else None
        result: list[dict[str, Any]] = self.request("GET", "/v1/incidents", params=params)
        return result

    def label_incident(self, incident_id: str, label: bool) -> dict[str, Any]:
        """Say whether an incident was a true (``True``) or false positive (operator, auditor)."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/incidents/{incident_id}/label", json={"label": label}
        )
        return result

    # zones and datasets
    def create_zone(self, name: str, description: str = "") -> dict[str, Any]:
        body = {"name": name, "description": description}
        result: dict[str, Any] = self.request("POST", "/v1/zones", json=body)
        return result

    def catalog(self) -> Catalog:
        """Every zone the caller may see, with its datasets, columns and levels.

        for zone in c.catalog().zones:
            for d in zone.datasets:
                print(zone.name, d.name, d.level, d.row_count_band)
        """
        return Catalog(self.request("GET", "/v1/catalog"))

    def zone(self, name: str) -> Zone:
        return Zone(self.request("GET", f"/v1/zones/{name}"))

    def dataset(self, zone: str, name: str) -> Dataset:
        return Dataset(self.request("GET", f"/v1/zones/{zone}/datasets/{name}"))

    def upload(self, zone: str, path: Path, media_type: str | None = None) -> dict[str, Any]:
        media = media_type or MEDIA_TYPES.get(path.suffix.lower())
        if media is None:
            raise ValueError(f"{path}: use a .csv or .parquet file (or give the media type)")
        result: dict[str, Any] = self.request(
            "POST",
            f"/v1/zones/{zone}/uploads",
            content=path.read_bytes(),
            headers={"content-type": media},
        )
        return result

    def register_dataset(
        self,
        zone: str,
        name: str,
        *,
        levels: Mapping[str, str],
        subject_column: str,
        description: str = "",
        file: Path | None = None,
        attach_url: str | None = None,
        attach_table: str | None = None,
        csv: Mapping[str, Any] | None = None,
        pi: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Register a dataset from a local CSV/Parquet file (uploaded) or an attached table.
        ``pi``: column -> personal-information class (``personal`` | ``sensitive``).
        ``csv`` says how a CSV file is written: ``{"delimiter": ";", "encoding": "gb18030",
        "rename": {"企业名称": "name"}}`` (each optional; default UTF-8, comma, headers as
        they are)."""
        body: dict[str, Any] = {
            "name": name,
            "description": description,
            "subject_column": subject_column,
            "levels": dict(levels),
        }
        if pi:
            body["pi"] = dict(pi)
        if file is not None:
            body["upload_id"] = self.upload(zone, file)["upload_id"]
        if attach_url is not None:
            body["attach"] = {"url": attach_url, "table": attach_table or name}
        if csv:
            body["csv"] = dict(csv)
        result: dict[str, Any] = self.request("POST", f"/v1/zones/{zone}/datasets", json=body)
        return result

    def publish_snapshot(
        self,
        zone: str,
        name: str,
        file: Path,
        *,
        levels: Mapping[str, str] | None = None,
        subject_column: str | None = None,
        description: str | None = None,
        csv: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Publish a new snapshot of a dataset you provide from a CSV/Parquet file: same
        columns, levels kept unless given; returns the dataset with its new digest. ``csv``:
        as for :meth:`register_dataset`.

            c.publish_snapshot("tax", "companies", Path("companies-2026.csv"))
        """
        body: dict[str, Any] = {"upload_id": self.upload(zone, Path(file))["upload_id"]}
        if levels:
            body["levels"] = dict(levels)
        if subject_column is not None:
            body["subject_column"] = subject_column
        if description is not None:
            body["description"] = description
        if csv:
            body["csv"] = dict(csv)
        result: dict[str, Any] = self.request(
            "POST", f"/v1/zones/{zone}/datasets/{name}/snapshots", json=body
        )
        return result

    def retire_dataset(self, zone: str, name: str, reason: str = "") -> dict[str, Any]:
        """Retire a dataset you provide: no more computations, gone from the catalog."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/zones/{zone}/datasets/{name}/retire", json={"reason": reason}
        )
        return result

    # ledger
    def checkpoint(self) -> dict[str, Any]:
        """The latest signed checkpoint: ``size``, ``root`` (base64) and the ``note`` as served
        at ``GET /v1/log/checkpoint`` (C2SP tlog-tiles). The note is not verified here: check
        it with the log's key (``crypto.note.verify_checkpoint``) before relying on it."""
        response = self._http.get("/v1/log/checkpoint")
        raise_for_problem(response)
        note = response.text
        try:
            body = note[: note.index("\n\n") + 1]
            parsed = Checkpoint.from_body(body.encode("utf-8"))
        except (ValueError, EncodingError) as exc:
            detail = f"not a checkpoint note: {exc}"
            raise ApiError(response.status_code, "bad_checkpoint", detail, detail, None) from exc
        return {"size": parsed.size, "root": b64_encode(parsed.root), "note": note}

    def tile(self, level: int, index: int, width: int | None = None) -> bytes:
        """A hash tile of the log (C2SP tlog-tiles), unverified bytes."""
        response = self._http.get(f"/v1/log/{tile_path(level, index, width)}")
        raise_for_problem(response)
        return response.content

    def entry_bundle(self, index: int, width: int | None = None) -> list[bytes]:
        """Entries ``[256 index, 256 index + width)`` (operator and auditors)."""
        response = self._http.get(f"/v1/log/{entries_path(index, width)}")
        raise_for_problem(response)
        return split_entry_bundle(response.content)

    def inclusion_proof(self, seq: int, size: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", "/v1/log/proof/inclusion", params={"seq": seq, "size": size}
        )
        return result

    def consistency_proof(self, size1: int, size2: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", "/v1/log/proof/consistency", params={"size1": size1, "size2": size2}
        )
        return result

    def entry(self, seq: int) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/log/entries/{seq}")
        return result

    def log_key(self) -> str:
        """The log's verifier key (what ``log.pub`` holds): checks checkpoints, bundles and
        receipts offline. Compare its key hash with the one the operator publishes.

            Path("log.pub").write_text(c.log_key() + "\\n")
        """
        result: dict[str, Any] = self.request("GET", "/v1/log/key")
        return str(result["verifier_key"])

    def export_ledger(self, out: IO[bytes]) -> int:
        """Stream the ledger export bundle (JSON Lines, as ``zonex ledger export`` writes it)
        into ``out``; the operator and auditors only. Returns the size of the checkpoint it
        ends with; raises :class:`ApiError` if the stream ends early.

            with open("ledger.jsonl", "wb") as f:
                size = c.export_ledger(f)
        """
        with self._http.stream("GET", "/v1/log/export") as response:
            if not response.is_success:
                response.read()
                raise_for_problem(response)
            size = response.headers.get("zonex-log-size", "")
            last = b""
            for chunk in response.iter_bytes():
                out.write(chunk)
                last = (last + chunk)[-65536:]
        tail = last.rstrip(b"\n").rpartition(b"\n")[2]
        try:
            note = json.loads(tail)["checkpoint"]
            ended_at = int(note.split("\n")[1])
        except (ValueError, KeyError, IndexError, TypeError):
            ended_at = -1
        if not size.isdigit() or ended_at != int(size):
            raise ApiError(502, "incomplete", "Incomplete bundle", "the export ended early", {})
        return ended_at

    def publish_report(
        self, period: str, bundle_size: int, bundle_root: str, digest: str
    ) -> dict[str, Any]:
        """Record a report (月报季评) on the ledger as ``report.published``; the operator and
        auditors only. ``digest``: hex SHA-256 of its ``report.json``; ``bundle_size`` and
        ``bundle_root``: the entries it was computed over (``zonex report`` writes all three).
        Returns the record: ``id``, ``seq`` of the entry, ``period`` ...

            done = c.publish_report("2026-11", 1520, root_hex, digest_hex)
        """
        result: dict[str, Any] = self.request(
            "POST",
            "/v1/reports",
            json={
                "period": period,
                "bundle_size": bundle_size,
                "bundle_root": bundle_root,
                "digest": digest,
            },
        )
        return result

    # access workflow
    def request_access(
        self,
        zone: str,
        datasets: list[str],
        operations: list[str],
        purpose: str,
        *,
        duration_seconds: int,
        justification: str,
    ) -> AccessRequest:
        """Ask a zone's provider for access; returns the pending request (keep its ``id``).

        req = c.request_access("tax", ["companies"], ["aggregate"], "credit-assessment",
                               duration_seconds=30 * 86400, justification="credit review")
        print(req.id, req.status)  # ... "pending"
        """
        body = {
            "zone": zone,
            "datasets": datasets,
            "operations": operations,
            "purpose": purpose,
            "duration_seconds": duration_seconds,
            "justification": justification,
        }
        return AccessRequest(self.request("POST", "/v1/access-requests", json=body))

    def requests(self, zone: str | None = None, status: str | None = None) -> list[AccessRequest]:
        params = {k: v for k, v in (("zone", zone), ("status", status)) if v is not None}
        found = self.request("GET", "/v1/access-requests", params=params)
        return [AccessRequest(r) for r in found]

    def get_request(self, request_id: str) -> AccessRequest:
        return AccessRequest(self.request("GET", f"/v1/access-requests/{request_id}"))

    def approve(
        self,
        request_id: str,
        *,
        not_after: datetime | None = None,
        datasets: list[str] | None = None,
        operations: list[str] | None = None,
    ) -> AccessRequest:
        """Sign an approval of the request's terms (optionally narrowed) with this client's key.

        ``not_after`` defaults to now plus the requested duration. A request awaiting the
        operator (important data its provider approved) is approved by signing its
        ``pending_terms`` exactly as the provider did; terms given here that differ from them
        are signed as given and refused by the exchange. ``request_id`` may be a unique prefix
        (6+ characters). Returns the request, its ``grant_id`` set once every required
        approval is in.

            approved = provider.approve(req.id)
            print(approved.status, approved.grant_id)
        """
        req = self.get_request(request_id)
        pending = req.get("pending_terms")
        if req.get("status") == "awaiting_operator" and pending:
            end = not_after or datetime.strptime(
                str(pending["not_after"]), "%Y-%m-%dT%H:%M:%SZ"
            ).replace(tzinfo=UTC)
            datasets = list(pending["datasets"]) if datasets is None else datasets
            operations = list(pending["operations"]) if operations is None else operations
        else:
            end = not_after or datetime.now(UTC) + timedelta(seconds=int(req["duration_seconds"]))
        payload = approval_payload(
            req, approver=self.key.key_id, not_after=end, datasets=datasets, operations=operations
        )
        envelope = sign_envelope(APPROVAL_TYPE, payload, [self.key])
        return AccessRequest(
            self.request(
                "POST",
                f"/v1/access-requests/{req['id']}/approve",
                json={"approval": envelope.model_dump(mode="json")},
            )
        )

    # cross-border flows (docs/cross-border.md)
    def record_xborder_approval(
        self,
        provider: str,
        document: str,
        document_bytes: bytes,
        *,
        valid_until: datetime,
        valid_from: datetime | None = None,
    ) -> dict[str, Any]:
        """Record a provider's compliance approval (operator): signs the terms, with the
        document's SHA-256 (the document itself is not sent)."""
        from policy.xborder import APPROVAL_TYPE as XBORDER_APPROVAL_TYPE
        from policy.xborder import approval_payload as xborder_approval_payload

        payload = xborder_approval_payload(
            provider=provider,
            document=document,
            document_sha256=hashlib.sha256(document_bytes).hexdigest(),
            valid_from=valid_from or datetime.now(UTC).replace(microsecond=0),
            valid_until=valid_until,
            approver=self.key.key_id,
        )
        envelope = sign_envelope(XBORDER_APPROVAL_TYPE, payload, [self.key])
        result: dict[str, Any] = self.request(
            "POST", "/v1/xborder/approvals", json={"approval": envelope.model_dump(mode="json")}
        )
        return result

    def xborder_approvals(self, provider: str | None = None) -> list[dict[str, Any]]:
        params = {"provider": provider} if provider else None
        result: list[dict[str, Any]] = self.request("GET", "/v1/xborder/approvals", params=params)
        return result

    def xborder_counts(self, provider: str, year: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"provider": provider}
        if year is not None:
            params["year"] = year
        result: dict[str, Any] = self.request("GET", "/v1/xborder/counts", params=params)
        return result

    def set_xborder_negative_list(self, zone: str, entries: list[list[str]]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PUT", f"/v1/xborder/zones/{zone}/negative-list", json={"entries": entries}
        )
        return result

    def xborder_request_check(self, request_id: str) -> list[dict[str, Any]]:
        """What an access request's datasets and operations would need abroad."""
        result: list[dict[str, Any]] = self.request("GET", f"/v1/xborder/requests/{request_id}")
        return result

    def reject(self, request_id: str, reason: str) -> AccessRequest:
        return AccessRequest(
            self.request(
                "POST", f"/v1/access-requests/{request_id}/reject", json={"reason": reason}
            )
        )

    def grants(self, zone: str | None = None, *, include_inactive: bool = False) -> list[Grant]:
        """The caller's grants (a consumer's own, a provider's on its zones); live ones only
        unless ``include_inactive``.

            for g in c.grants("tax"):
                print(g.id, g.operations, g.expires_at.isoformat())
        """
        params: dict[str, Any] = {"all": include_inactive}
        if zone is not None:
            params["zone"] = zone
        return [Grant(g) for g in self.request("GET", "/v1/grants", params=params)]

    def revoke(self, grant_id: str, reason: str) -> Grant:
        return Grant(self.request("POST", f"/v1/grants/{grant_id}/revoke", json={"reason": reason}))

    def set_zone_status(self, zone: str, status: str) -> None:
        response = self._http.request("POST", f"/v1/zones/{zone}/status", json={"status": status})
        raise_for_problem(response)

    def set_ceilings(
        self, zone: str, ceilings: Mapping[str, list[str]], *, dataset: str | None = None
    ) -> dict[str, list[str]]:
        path = f"/v1/zones/{zone}" + (f"/datasets/{dataset}" if dataset else "") + "/ceilings"
        result: dict[str, list[str]] = self.request("PUT", path, json={"ceilings": dict(ceilings)})[
            "ceilings"
        ]
        return result

    def record_consent(
        self,
        zone: str,
        subject: str | None,
        consumer: str,
        purpose: str,
        expires_at: datetime,
        *,
        subject_digest: str | None = None,
    ) -> dict[str, Any]:
        """Record a consent: ``subject`` for a zone the exchange hosts; for a zone on its
        provider's node, ``subject_digest`` instead, made with the node's key
        (:func:`exchange.node.export.node_subjects`, ``zonex consent add --node``)."""
        body = {
            **({"subject": subject} if subject_digest is None else {}),
            **({} if subject_digest is None else {"subject_digest": subject_digest}),
            "consumer": consumer,
            "purpose": purpose,
            "expires_at": expires_at.isoformat(),
        }
        result: dict[str, Any] = self.request("POST", f"/v1/zones/{zone}/consents", json=body)
        return result

    def import_consents(self, zone: str, consents: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Record many consents in one call, all or nothing: ``{"zone", "recorded", "ids"}``,
        the ids in the order given. Each item has ``subject`` (or, for a zone on its
        provider's node, ``subject_digest`` made with the node's key), ``consumer`` (name, key id or
        unique key id prefix), ``purpose`` and ``expires_at`` (a datetime with a time zone, or
        RFC 3339 text). A refusal (:class:`ApiError`, 422) names the bad rows in ``errors``
        (``row`` is the 0-based index) and records nothing.

        Example::

            c.import_consents("tax", [
                {"subject": "91310000X", "consumer": "bank", "purpose": "credit_scoring",
                 "expires_at": datetime(2027, 1, 1, tzinfo=UTC)},
            ])
        """
        rows = [
            {
                **(
                    {"subject_digest": c["subject_digest"]}
                    if "subject_digest" in c
                    else {"subject": c["subject"]}
                ),
                "consumer": c["consumer"],
                "purpose": c["purpose"],
                "expires_at": (
                    c["expires_at"].isoformat()
                    if isinstance(c["expires_at"], datetime)
                    else c["expires_at"]
                ),
            }
            for c in consents
        ]
        path = f"/v1/zones/{zone}/consents/import"
        result: dict[str, Any] = self.request("POST", path, json={"consents": rows})
        return result

    def consents(self, zone: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", f"/v1/zones/{zone}/consents")
        return result

    def withdraw_consent(self, consent_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/consents/{consent_id}/withdraw")
        return result

    # computations
    def export(self, zone: str, dataset: str, purpose: str) -> Computation:
        """Rows of a dataset under an export grant (subject ids pseudonymized), with a receipt.

        out = c.export("tax", "companies", "credit-assessment")
        print(out.columns, len(out.rows), out.result["masked"])

        A dataset hosted on its zone's node comes back sealed to this client's key: it is
        opened here and checked against the digests the node signed (:func:`open_export`);
        ``rows`` then holds the rows and ``result`` the signed result (counts and digests).
        """
        answer = self.request(
            "POST", f"/v1/zones/{zone}/datasets/{dataset}/export", json={"purpose": purpose}
        )
        return open_export(self.key, answer)

    def analysis_rules(self, zone: str, dataset: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", f"/v1/zones/{zone}/datasets/{dataset}/analysis-rules"
        )
        return result

    def set_analysis_rules(self, zone: str, dataset: str, rules: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "PUT", f"/v1/zones/{zone}/datasets/{dataset}/analysis-rules", json={"rules": rules}
        )
        return result

    def aggregate(
        self, zone: str, sql: str, purpose: str, *, epsilon: str | None = None
    ) -> Computation:
        """Run a clean-room SQL aggregate under the zone's analysis rules (differentially
        private by default from L3; ``epsilon`` is a decimal string). Returns the result
        (``columns``, ``rows``, ``k``, ``epsilon``, ``noise``, ...) and its signed receipt.

            out = c.aggregate("tax", "SELECT district, SUM(tax_paid_2025) FROM companies "
                              "GROUP BY district", "credit-assessment", epsilon="0.5")
            for district, total in out.rows:
                print(district, total)
        """
        body: dict[str, Any] = {"sql": sql, "purpose": purpose}
        if epsilon is not None:
            body["epsilon"] = epsilon
        return Computation(self.request("POST", f"/v1/zones/{zone}/aggregate", json=body))

    def budgets(self, zone: str | None = None) -> list[Budget]:
        """The caller's privacy budgets (ε as :class:`~decimal.Decimal`) per dataset.

        for b in c.budgets("tax"):
            print(b.dataset, b.spent, "of", b.budget, "until", b.window_end)
        """
        params = {"zone": zone} if zone else None
        return [Budget(b) for b in self.request("GET", "/v1/budgets", params=params)]

    # homomorphic encryption
    def upload_context(self, data: bytes) -> dict[str, Any]:
        """Register a public HE context (no secret key); returns its digest and parameters."""
        result: dict[str, Any] = self.request(
            "POST",
            "/v1/he/contexts",
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        return result

    def context(self, digest: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/he/contexts/{digest}")
        return result

    # -- private joins (psi) --
    #: the zone's work (blinding Y, encrypting values) runs inside one request
    PSI_TIMEOUT = 3600.0

    def psi_create(self, **body: Any) -> dict[str, Any]:
        """Open a private-join session (the low-level step; see :meth:`psi_join`)."""
        result: dict[str, Any] = self.request("POST", "/v1/psi/sessions", json=body)
        return result

    def psi_session(self, session: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/psi/sessions/{session}")
        return result

    def _psi_points(self, session: str, which: str, offset: int, data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST",
            f"/v1/psi/sessions/{session}/{which}/points",
            params={"offset": offset},
            content=data,
            headers={"content-type": "application/octet-stream"},
            timeout=self.PSI_TIMEOUT,
        )
        return result

    def psi_put_a(self, session: str, offset: int, data: bytes) -> dict[str, Any]:
        return self._psi_points(session, "a", offset, data)

    def psi_put_bc(self, session: str, offset: int, data: bytes) -> dict[str, Any]:
        return self._psi_points(session, "bc", offset, data)

    def psi_get_b(self, session: str, offset: int, limit: int) -> bytes:
        response = self._http.get(
            f"/v1/psi/sessions/{session}/b/points",
            params={"offset": offset, "limit": limit},
            timeout=self.PSI_TIMEOUT,
        )
        raise_for_problem(response)
        return response.content

    def psi_get_ae(self, session: str, offset: int, limit: int) -> bytes:
        """Epoch mode: a slice of A_e = k_e·A (|X| points in all)."""
        response = self._http.get(
            f"/v1/psi/sessions/{session}/ae/points",
            params={"offset": offset, "limit": limit},
            timeout=self.PSI_TIMEOUT,
        )
        raise_for_problem(response)
        return response.content

    def psi_put_f(self, session: str, offset: int, data: bytes) -> dict[str, Any]:
        """Epoch mode: a batch of F = c⁻¹·A_e, in A's order."""
        return self._psi_points(session, "f", offset, data)

    def psi_prepare_epoch(self, zone: str, dataset: str) -> dict[str, Any]:
        """The provider asks its zone to prepare an epoch of ``dataset`` (in the background);
        returns the dataset's epochs (see :meth:`psi_epochs`)."""
        result: dict[str, Any] = self.request(
            "POST", "/v1/psi/epochs", json={"zone": zone, "dataset": dataset}
        )
        return result

    def psi_epochs(self, zone: str, dataset: str) -> dict[str, Any]:
        """A dataset's epochs (its provider): ``current`` (the id serving new sessions, or
        ``None``) and ``epochs`` (id, snapshot, state, y_count, done, sessions, ...)."""
        result: dict[str, Any] = self.request(
            "GET", "/v1/psi/epochs", params={"zone": zone, "dataset": dataset}
        )
        return result

    def psi_result(self, session: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/psi/sessions/{session}/result", timeout=self.PSI_TIMEOUT
        )
        return result

    def psi_join(
        self,
        zone: str,
        dataset: str,
        mode: str,
        ids: Any,
        purpose: str,
        **options: Any,
    ) -> dict[str, Any]:
        """Run a whole private join from this machine (:func:`exchange.client.psi.run`)."""
        from exchange.client import psi as psi_client

        return psi_client.run(
            self, zone=zone, dataset=dataset, mode=mode, ids=ids, purpose=purpose, **options
        )

    # -- homomorphic scoring and secure sums --
    # (raw calls; the key holder's side, which never sends a secret key: exchange.client.he)

    def commit_model(self, document: Mapping[str, Any]) -> dict[str, Any]:
        """Register a model commitment (public document only; weights stay with you)."""
        result: dict[str, Any] = self.request(
            "POST", "/v1/he/models", json={"document": dict(document)}
        )
        return result

    def model(self, commitment: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/he/models/{commitment}")
        return result

    def upload_ciphertexts(self, context: str, data: bytes) -> dict[str, Any]:
        """Upload framed ciphertexts (:func:`crypto.he.pack_ciphertexts`) made under a context."""
        result: dict[str, Any] = self.request(
            "POST",
            f"/v1/he/contexts/{context}/uploads",
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        return result

    def he_score(
        self,
        *,
        zone: str,
        dataset: str,
        purpose: str,
        model: str,
        context: str,
        weights: str,
        ids: list[str],
    ) -> dict[str, Any]:
        """Encrypted scores of consented entities: ``{"result", "receipt", "ciphertexts",
        "subjects_nonce"}`` (the nonce opens ``result["subjects"]``, the commitment to the ids:
        keep it to show an auditor which ids were scored). A refusal of some ids raises
        :class:`ScoreRefusedError` with their positions."""
        body = {
            "zone": zone,
            "dataset": dataset,
            "purpose": purpose,
            "model": model,
            "context": context,
            "weights": weights,
            "ids": ids,
        }
        try:
            result: dict[str, Any] = self.request("POST", "/v1/he/score", json=body)
        except ApiError as exc:
            if isinstance(exc.body, dict) and "refused_count" in exc.body:
                raise ScoreRefusedError.from_error(exc) from None
            raise
        return result

    def secure_sum(
        self,
        *,
        zones: list[str],
        sql: str,
        purpose: str,
        context: str,
        cells: list[list[str]],
        epsilon: str | None = None,
    ) -> dict[str, Any]:
        """An encrypted total over zones: ``{"result", "receipt", "ciphertext", ...}``."""
        body: dict[str, Any] = {
            "zones": zones,
            "sql": sql,
            "purpose": purpose,
            "context": context,
            "cells": cells,
        }
        if epsilon is not None:
            body["epsilon"] = epsilon
        result: dict[str, Any] = self.request("POST", "/v1/he/secure-sum", json=body)
        return result


def open_export(key: SigningKey, answer: Mapping[str, Any]) -> Computation:
    """An export answer as a :class:`Computation`. When its rows come sealed (a dataset hosted
    on its zone's node), check that the node named in the receipt signed the result's digests
    (its signed result travels in the receipt), open the rows with the consumer's private
    ``key`` (the X25519 form of its Ed25519 key) and check them against those digests: the
    blob's SHA-256 (``sealed_sha256``), the plaintext's (``rows_sha256``, over the rows and a
    salt) and the count
    (``row_count``). The receipt's own signature is :meth:`Computation.verify`'s to check.
    Raises :class:`crypto.errors.VerificationError` with one readable line when the blob was
    altered, sealed to another key, or does not match the result."""
    import nacl.exceptions
    import nacl.public
    import nacl.signing

    from crypto.encoding import b64url_decode
    from crypto.errors import VerificationError

    sealed = answer.get("sealed")
    out = {k: v for k, v in answer.items() if k != "sealed"}
    if sealed is None:
        return Computation(out)
    result = answer.get("result")
    if not isinstance(result, Mapping):
        raise VerificationError("the export answer has no result")
    _check_node_signed(answer.get("receipt"), result)
    try:
        blob = b64url_decode(str(sealed))
    except EncodingError as exc:
        raise VerificationError("the sealed rows are not base64url") from exc
    if hashlib.sha256(blob).hexdigest() != result.get("sealed_sha256"):
        raise VerificationError(
            "the sealed rows are not the blob the zone's node signed (altered on the way)"
        )
    try:
        private = nacl.signing.SigningKey(key.seed()).to_curve25519_private_key()
        plain = nacl.public.SealedBox(private).decrypt(blob)
    except (nacl.exceptions.CryptoError, ValueError) as exc:
        raise VerificationError(
            f"the sealed rows do not open with key {key.key_id[:16]}...: they are sealed to the "
            "consumer that asked for the export; use its private key"
        ) from exc
    if hashlib.sha256(plain).hexdigest() != result.get("rows_sha256"):
        raise VerificationError("the opened rows are not the rows the zone's node signed")
    opened = json.loads(plain)  # {"rows", "salt"}: the salt keeps rows_sha256 from a guess
    rows = opened.get("rows") if isinstance(opened, dict) else None
    if not isinstance(rows, list) or len(rows) != result.get("row_count"):
        raise VerificationError("the opened rows are not as many as the zone's node signed")
    out["rows"] = rows
    return Computation(out)


def _check_node_signed(receipt: Any, result: Mapping[str, Any]) -> None:
    """The node named in the receipt's statement signed the result's digests (the statement's
    own signature, by the log key, is :meth:`Computation.verify`'s to check)."""
    from crypto.envelope import Envelope
    from crypto.errors import VerificationError
    from crypto.receipt import check_node_result

    try:
        statement = json.loads(Envelope.model_validate(receipt["statement"]).payload_bytes())
    except (KeyError, TypeError, ValueError, EncodingError) as exc:
        raise VerificationError("the export's receipt carries no readable statement") from exc
    if not isinstance(statement, dict) or statement.get("node") is None:
        raise VerificationError("sealed rows without a zone node's signed result")
    check_node_result(receipt, statement, result)
