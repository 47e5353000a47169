"""Python client for the zonex API. Signs every request (RFC 9421) with the caller's key."""

from __future__ import annotations

import secrets
import time
from collections.abc import Generator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from crypto.encoding import b64url_encode
from crypto.envelope import sign_envelope
from crypto.httpsig import sign_request
from crypto.keys import SigningKey, VerifyKey
from exchange.domain import APPROVAL_TYPE, approval_payload

MEDIA_TYPES = {".csv": "text/csv", ".parquet": "application/vnd.apache.parquet"}


class ApiError(Exception):
    """The server answered with a problem+json (or another error)."""

    def __init__(self, status: int, code: str, title: str, detail: str, body: Any) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.body = body


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
    """A signed session with one exchange."""

    def __init__(
        self,
        base_url: str,
        key: SigningKey,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
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
        response = self._http.request(method, path, **kwargs)
        raise_for_problem(response)
        return response.json()

    # principals
    def whoami(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/principals/me")
        return result

    def register_principal(self, name: str, kind: str, public_key: VerifyKey) -> dict[str, Any]:
        body = {"name": name, "kind": kind, "public_key": b64url_encode(public_key.raw)}
        result: dict[str, Any] = self.request("POST", "/v1/principals", json=body)
        return result

    def list_principals(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/v1/principals")
        return result

    def set_principal_status(self, key_id: str, status: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/principals/{key_id}/status", json={"status": status}
        )
        return result

    # zones and datasets
    def create_zone(self, name: str, description: str = "") -> dict[str, Any]:
        body = {"name": name, "description": description}
        result: dict[str, Any] = self.request("POST", "/v1/zones", json=body)
        return result

    def catalog(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/catalog")
        return result

    def zone(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/zones/{name}")
        return result

    def dataset(self, zone: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/zones/{zone}/datasets/{name}")
        return result

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
    ) -> dict[str, Any]:
        """Register a dataset from a local CSV/Parquet file (uploaded) or an attached table."""
        body: dict[str, Any] = {
            "name": name,
            "description": description,
            "subject_column": subject_column,
            "levels": dict(levels),
        }
        if file is not None:
            body["upload_id"] = self.upload(zone, file)["upload_id"]
        if attach_url is not None:
            body["attach"] = {"url": attach_url, "table": attach_table or name}
        result: dict[str, Any] = self.request("POST", f"/v1/zones/{zone}/datasets", json=body)
        return result

    # ledger
    def checkpoint(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/log/checkpoint")
        return result

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
    ) -> dict[str, Any]:
        body = {
            "zone": zone,
            "datasets": datasets,
            "operations": operations,
            "purpose": purpose,
            "duration_seconds": duration_seconds,
            "justification": justification,
        }
        result: dict[str, Any] = self.request("POST", "/v1/access-requests", json=body)
        return result

    def requests(self, zone: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("zone", zone), ("status", status)) if v is not None}
        result: list[dict[str, Any]] = self.request("GET", "/v1/access-requests", params=params)
        return result

    def get_request(self, request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/access-requests/{request_id}")
        return result

    def approve(
        self,
        request_id: str,
        *,
        not_after: datetime | None = None,
        datasets: list[str] | None = None,
        operations: list[str] | None = None,
    ) -> dict[str, Any]:
        """Sign an approval of the request's terms (optionally narrowed) with this client's key.

        ``not_after`` defaults to now plus the requested duration."""
        req = self.get_request(request_id)
        end = not_after or datetime.now(UTC) + timedelta(seconds=int(req["duration_seconds"]))
        payload = approval_payload(
            req, approver=self.key.key_id, not_after=end, datasets=datasets, operations=operations
        )
        envelope = sign_envelope(APPROVAL_TYPE, payload, [self.key])
        result: dict[str, Any] = self.request(
            "POST",
            f"/v1/access-requests/{request_id}/approve",
            json={"approval": envelope.model_dump(mode="json")},
        )
        return result

    def reject(self, request_id: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/access-requests/{request_id}/reject", json={"reason": reason}
        )
        return result

    def grants(self, zone: str | None = None, *, include_inactive: bool = False) -> list[Any]:
        params: dict[str, Any] = {"all": include_inactive}
        if zone is not None:
            params["zone"] = zone
        result: list[dict[str, Any]] = self.request("GET", "/v1/grants", params=params)
        return result

    def revoke(self, grant_id: str, reason: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/grants/{grant_id}/revoke", json={"reason": reason}
        )
        return result

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
        self, zone: str, subject: str, consumer: str, purpose: str, expires_at: datetime
    ) -> dict[str, Any]:
        body = {
            "subject": subject,
            "consumer": consumer,
            "purpose": purpose,
            "expires_at": expires_at.isoformat(),
        }
        result: dict[str, Any] = self.request("POST", f"/v1/zones/{zone}/consents", json=body)
        return result

    def consents(self, zone: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", f"/v1/zones/{zone}/consents")
        return result

    def withdraw_consent(self, consent_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/consents/{consent_id}/withdraw")
        return result

    # computations
    def export(self, zone: str, dataset: str, purpose: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/zones/{zone}/datasets/{dataset}/export", json={"purpose": purpose}
        )
        return result

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
    ) -> dict[str, Any]:
        """Run a clean-room SQL aggregate; returns ``{"result": ..., "receipt": ...}``."""
        body: dict[str, Any] = {"sql": sql, "purpose": purpose}
        if epsilon is not None:
            body["epsilon"] = epsilon
        result: dict[str, Any] = self.request("POST", f"/v1/zones/{zone}/aggregate", json=body)
        return result

    def budgets(self, zone: str | None = None) -> list[dict[str, Any]]:
        params = {"zone": zone} if zone else None
        result: list[dict[str, Any]] = self.request("GET", "/v1/budgets", params=params)
        return result

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
        """Run a whole private join from this machine (:func:`exchange.psi_client.run`)."""
        from exchange import psi_client

        return psi_client.run(
            self, zone=zone, dataset=dataset, mode=mode, ids=ids, purpose=purpose, **options
        )

    # -- homomorphic scoring and secure sums --
    # (raw calls; the key holder's side, which never sends a secret key: exchange.he_client)

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
