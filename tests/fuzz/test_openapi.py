"""Property-based fuzzing of every operation in the live OpenAPI schema (schemathesis).

A real server on loopback serves its own ``/openapi.json``; every operation gets generated
requests, valid by the schema and invalid, each signed (RFC 9421) with a registered
principal's key so that they reach the handlers rather than stopping at authentication. Runs
as the operator and as an enterprise. Checks: no 5xx, responses match the declared status
codes, content types and schemas, and every 4xx is an RFC 9457 problem."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from crypto.httpsig import sign_request
from crypto.keys import SigningKey
from tests.conftest import LiveServer
from tests.security._support import World, build_world

#: per operation: (generation mode, path parameters naming existing objects?, examples); the
#: whole run stays within about a minute per principal
PLAN = [
    (GenerationMode.POSITIVE, True, 20),
    (GenerationMode.POSITIVE, False, 8),
    (GenerationMode.NEGATIVE, True, 10),
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
PROBLEM_FIELDS = {"type", "title", "status", "detail"}


class SignedAuth(requests.auth.AuthBase):
    """Signs each prepared request exactly as it goes on the wire (what the SDK does)."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        # the schema declares the signature as a header, so generated cases carry a value of
        # their own: the real one replaces it
        for name in ("Signature", "Signature-Input"):
            r.headers.pop(name, None)
        body = r.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
            r.body = body
        headers = sign_request(
            str(r.method),
            str(r.url),
            r.headers,
            body,
            self.key,
            created=int(time.time()),
            nonce=secrets.token_urlsafe(18),
        )
        r.headers.update(headers)
        return r


def _problem_failures(response: schemathesis.Response) -> list[str]:
    if not 400 <= response.status_code < 500:
        return []
    media = (response.headers.get("content-type") or [""])[0]
    if not media.startswith("application/problem+json"):
        return [f"{response.status_code} with content-type {media!r}"]
    try:
        body = response.json()
    except ValueError:
        return [f"{response.status_code}: the problem body is not JSON"]
    missing = PROBLEM_FIELDS - set(body) if isinstance(body, dict) else PROBLEM_FIELDS
    if missing:
        return [f"{response.status_code}: the problem lacks {sorted(missing)}"]
    if body["status"] != response.status_code:
        return [f"problem status {body['status']} on a {response.status_code} response"]
    return []


@dataclass
class _Run:
    base_url: str
    session: requests.Session
    failures: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def check(self, operation: Any, mode: GenerationMode, fixed: dict[str, str], n: int) -> None:
        """Send ``n`` generated requests to one operation and note every failed check."""
        seen: set[str] = set()
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed or None)

        @given(case=strategy)
        @settings(
            max_examples=n,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call(base_url=self.base_url, session=self.session, timeout=30)
            self.statuses[response.status_code] += 1
            problems = _problem_failures(response)
            try:
                case.validate_response(response, checks=CHECKS)
            except FailureGroup as group:
                problems.extend(
                    str(failure).strip().replace("\n\n", "; ").replace("\n", " ")[:300]
                    for failure in group.exceptions
                )
            for problem in problems:
                label = f"{operation.label} [{mode.value}]: {problem}"
                if label not in seen:
                    seen.add(label)
                    self.failures.append(f"{label}\n    {case.as_curl_command()}")

        try:
            run()
        except Unsatisfiable:
            # nothing to make invalid (no parameters and no body)
            assert mode is GenerationMode.NEGATIVE, operation.label


def _fuzz(server: LiveServer, key: SigningKey, known: dict[str, str]) -> _Run:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    session = requests.Session()
    session.auth = SignedAuth(key)
    fuzz = _Run(server.url, session)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30
    try:
        for operation in operations:
            names = {p.name for p in operation.path_parameters}
            for mode, existing, examples in PLAN:
                fixed = {n: known[n] for n in names if n in known} if existing else {}
                if (existing and names and not fixed) or (not existing and not names):
                    continue  # no object to name, or nothing random to put in the path
                fuzz.check(operation, mode, fixed, examples)
    finally:
        session.close()
    return fuzz


@pytest.fixture
def fuzz_world(server: LiveServer) -> tuple[World, dict[str, str]]:
    """Principals, zones and datasets, and one of each object a path can name."""
    world = build_world(server)
    with server.client(world.key("consumer")) as c:
        req = c.request_access(
            "tax",
            ["open_companies"],
            ["export", "aggregate"],
            "credit-assessment",
            duration_seconds=3600,
            justification="fuzz",
        )
        pending = c.request_access(
            "tax",
            ["companies"],
            ["aggregate"],
            "credit-assessment",
            duration_seconds=3600,
            justification="fuzz",
        )
    with server.client(world.key("provider")) as p:
        grant = p.approve(req["id"])["grant_id"]
        consent = p.record_consent(
            "tax",
            "91310000000000000X",
            world.key("consumer").key_id,
            "credit-assessment",
            datetime.now(UTC) + timedelta(days=1),
        )["id"]
    known = {
        "zone": "tax",
        "name": "open_companies",
        "key_id": world.key("bank2").key_id,
        "request_id": pending["id"],
        "grant_id": grant,
        "consent_id": consent,
        "seq": "1",
    }
    return world, known


@pytest.mark.parametrize("who", ["operator", "consumer"])
def test_every_operation_honours_its_schema(
    fuzz_world: tuple[World, dict[str, str]], who: str
) -> None:
    world, known = fuzz_world
    fuzz = _fuzz(world.server, world.key(who), known)
    assert not fuzz.failures, "\n".join(fuzz.failures[:40])
    # the signed requests reached the handlers: none stopped at authentication, some succeeded
    assert fuzz.statuses[401] == 0
    assert sum(n for s, n in fuzz.statuses.items() if 200 <= s < 300) >= 20
