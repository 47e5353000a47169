"""Python client for the zonex API. Signs every request (RFC 9421) with the caller's key."""

from __future__ import annotations

import secrets
import time
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

import httpx

from crypto.encoding import b64url_encode
from crypto.httpsig import sign_request
from crypto.keys import SigningKey, VerifyKey

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
