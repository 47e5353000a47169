"""The FastAPI application: a thin shell over the services.

Every route except ``/v1/health``, ``/v1/ready`` and ``/metrics`` authenticates the request
(RFC 9421) before anything else; one handler maps the error tree to RFC 9457 problem+json.
"""

import asyncio
import hashlib
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Connection
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crypto.encoding import b64_encode, b64url_decode
from crypto.errors import EncodingError
from crypto.merkle import leaf_hash
from exchange.domain import PrincipalKind
from exchange.errors import (
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    ZonexError,
)
from exchange.server import access, services
from exchange.server.api import chain as chain_routes
from exchange.server.api import datasets as dataset_routes
from exchange.server.api import he as he_routes
from exchange.server.api import incidents as incident_routes
from exchange.server.api import log as log_routes
from exchange.server.api import nodes as node_routes
from exchange.server.api import openapi as openapi_docs
from exchange.server.api import psi as psi_routes
from exchange.server.api import reports as report_routes
from exchange.server.api import tiles as tile_routes
from exchange.server.api import xborder as xborder_routes
from exchange.server.api.deps import Actor, Ex, principal, principal_of_body, registry_version
from exchange.server.api.refusals import reason_of, record_refusal
from exchange.server.api.schemas import (
    PROBLEM_RESPONSES,
    AccessRequestIn,
    AccessRequestOut,
    AggregateIn,
    ApproveIn,
    BudgetOut,
    CatalogOut,
    CeilingsIn,
    CeilingsOut,
    ComputationOut,
    ConsentImportIn,
    ConsentImportOut,
    ConsentIn,
    ConsentOut,
    ConsistencyProofOut,
    DatasetIn,
    DatasetOut,
    EntryOut,
    ExportOut,
    GrantOut,
    InclusionProofOut,
    PrincipalIn,
    PrincipalOut,
    PurposeIn,
    ReasonIn,
    RulesIn,
    RulesOut,
    StatusIn,
    UploadOut,
    ZoneIn,
    ZoneOut,
)
from exchange.server.compute import aggregate, rules
from exchange.server.compute.export import export_rows
from exchange.server.observability import (
    METRICS_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    RequestContextMiddleware,
    current_request_id,
    observe_computation,
    readiness_problem,
    render_metrics,
)
from exchange.server.runtime import Exchange
from exchange.settings import Settings

log = logging.getLogger("zonex.api")

PROBLEM = "application/problem+json"
UPLOAD_SUFFIX = "/uploads"
#: binary bodies: HE public contexts and PSI point batches
CONTEXT_SUFFIX = "/he/contexts"
POINTS_SUFFIX = "/points"
#: the binary outputs a zone node uploads for a task (exchange.server.dispatch.TaskFiles)
NODE_OUTPUTS = ("a_prime", "a_e", "b", "ciphertexts", "scores", "ciphertext")


CATALOG_SNAPSHOT = "catalog"


@dataclass(frozen=True)
class RenderedCatalog:
    body: bytes
    digest: str
    #: the registry version the catalog was read at
    version: int


def _render_catalog(conn: Connection, version: int) -> RenderedCatalog:
    with Session(bind=conn) as session:
        zones = services.load_catalog(session)
    body = CatalogOut(zones=[ZoneOut.from_domain(z) for z in zones]).model_dump_json().encode()
    return RenderedCatalog(body, hashlib.sha256(body).hexdigest(), version)


def problem(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {
        "type": f"urn:zonex:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    request_id = current_request_id()
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


class BodyLimitMiddleware:
    """Refuse oversized or encoded bodies before the application reads them."""

    def __init__(
        self, app: ASGIApp, json_limit: int, binary_limits: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.json_limit = json_limit
        #: path suffix -> limit, for the routes that take binary bodies
        self.binary_limits = dict(binary_limits or {})

    def limit_for(self, path: str) -> int:
        """The first matching entry's limit: a key ``"PREFIX*SUFFIX"`` matches paths with both,
        a plain key matches paths ending in it."""
        for pattern, limit in self.binary_limits.items():
            prefix, star, suffix = pattern.rpartition("*")
            if path.endswith(suffix) and (not star or path.startswith(prefix)):
                return limit
        return self.json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        limit = self.limit_for(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # no decompression: a compressed body could expand without bound
            await problem(
                415,
                "unsupported_media_type",
                "Unsupported media type",
                "content-encoding is not accepted",
            )(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await problem(400, "invalid_input", "Invalid input", "bad content-length")(
                    scope, receive, send
                )
                return
            if int(length) > limit:
                await problem(
                    413,
                    "payload_too_large",
                    "Payload too large",
                    f"body exceeds {limit} bytes",
                )(scope, receive, send)
                return
        received = 0
        exceeded = started = False

        async def limited() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            # a body parser may catch _TooLarge and answer 400: that answer is dropped
            nonlocal started
            if exceeded and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with suppress(_TooLarge):
            await self.app(scope, limited, guarded)
        if exceeded and not started:
            await problem(
                413, "payload_too_large", "Payload too large", f"body exceeds {limit} bytes"
            )(scope, receive, send)


class _TooLarge(Exception):
    pass


def _authenticates(request: Request) -> bool:
    """The matched route depends on :func:`exchange.server.api.deps.principal`."""
    pending = list(
        getattr(getattr(request.scope.get("route"), "dependant", None), "dependencies", [])
    )
    while pending:
        dependant = pending.pop()
        if dependant.call is principal:
            return True
        pending.extend(dependant.dependencies)
    return False


#: what json.loads may have decoded a body from (json.detect_encoding), UTF-8 first
_JSON_ENCODINGS = ("utf-8", "utf-8-sig", "utf-16-be", "utf-16-le", "utf-32-be", "utf-32-le")


def _decoded_body(text: str, content_digest: str) -> bytes:
    """The bytes json.loads decoded into ``text``: it reads UTF-16 and UTF-32 too (a body
    starting with a NUL byte), so the encoding whose bytes match the signed Content-Digest is
    taken; UTF-8 when none does (the signature check then refuses it)."""
    for encoding in _JSON_ENCODINGS:
        try:
            data = text.encode(encoding, "surrogatepass")
        except UnicodeEncodeError:
            continue
        if f":{b64_encode(hashlib.sha256(data).digest())}:" in content_digest:
            return data
    return text.encode("utf-8", "surrogatepass")


def _version() -> str:
    try:
        return importlib.metadata.version("zonex")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def create_app(settings: Settings | None = None, exchange: Exchange | None = None) -> FastAPI:
    """Build the app. Pass ``exchange`` to share an already-started one (tests, embedding)."""
    if exchange is None and settings is None:
        raise ValueError("give settings or an exchange")
    owned = exchange is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ex = exchange if exchange is not None else Exchange(settings)  # type: ignore[arg-type]
        if owned:
            ex.start()
        app.state.exchange = ex
        try:
            yield
        finally:
            if owned:
                ex.close()

    app = FastAPI(
        title="zonex",
        version=_version(),
        lifespan=lifespan,
        responses=PROBLEM_RESPONSES,
        # /docs is served by exchange.server.api.openapi: a self-contained page, no CDN assets
        docs_url=None,
        redoc_url=None,
    )
    cfg = settings if settings is not None else exchange.settings  # type: ignore[union-attr]
    app.add_middleware(
        BodyLimitMiddleware,
        json_limit=cfg.max_json_bytes,
        binary_limits={
            # ciphertexts under a registered context, before the dataset uploads they resemble
            "/v1/he/contexts/*" + UPLOAD_SUFFIX: cfg.max_he_upload_bytes,
            UPLOAD_SUFFIX: cfg.max_upload_bytes,
            CONTEXT_SUFFIX: cfg.max_he_context_bytes,
            "/consents/import": cfg.max_consent_import_bytes,
            POINTS_SUFFIX: cfg.max_psi_batch_bytes,
            # a zone node's bulk outputs (PSI points and ciphertexts), in chunks
            **{
                f"/v1/node/tasks/*/outputs/{name}": cfg.max_psi_batch_bytes for name in NODE_OUTPUTS
            },
            # a prepared epoch's fingerprints and positions from a zone node, in chunks
            **{
                f"/v1/node/psi/epochs/*/files/{name}": cfg.max_psi_batch_bytes
                for name in ("fp", "pos")
            },
        },
    )
    # outermost: every response, refusals by the body limit included, carries a request id
    app.add_middleware(RequestContextMiddleware)

    # Every 4xx answer to a request whose signature verified is ledgered here, in one place
    # (exchange.server.api.refusals), unless the domain already ledgered it (exc.ledgered)

    def error_problem(exc: ZonexError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.detail, exc_info=exc.__cause__)
        extra = {k: v for k, v in exc.extra.items() if isinstance(v, (str, int))}
        if isinstance(exc.extra.get("errors"), list):  # field or row problems the domain named
            extra["errors"] = exc.extra["errors"]
        return problem(exc.status, exc.code, exc.title, exc.detail, **extra)

    @app.exception_handler(ZonexError)
    async def zonex_error(request: Request, exc: ZonexError) -> JSONResponse:
        if not exc.ledgered:
            await record_refusal(request, exc.status, exc.code, reason_of(exc))
        return error_problem(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        found = exc.errors()
        kind = str(found[0].get("type", "")) if found else ""
        if (
            kind == "json_invalid"
            and getattr(request.state, "principal", None) is None
            and isinstance(exc.body, str)
            and _authenticates(request)
        ):
            # the framework refused the body before the signature was checked: check it now,
            # so an unauthenticated caller learns nothing and a signer's refusal is ledgered
            # (the text is what json.loads decoded from the body received)
            received = _decoded_body(exc.body, request.headers.get("content-digest", ""))
            try:
                await principal_of_body(request, received)
            except ZonexError as failed:
                return error_problem(failed)
        await record_refusal(request, 422, "invalid_input", kind or "invalid_input")
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in found[:20]
        ]
        return problem(
            422, "invalid_input", "Invalid input", "request body is invalid", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        await record_refusal(request, exc.status_code, code, code)
        return problem(exc.status_code, code, str(exc.detail), str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(500, "internal", "Internal error", "an internal error occurred")

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/ready", response_model=None)
    async def ready(request: Request) -> dict[str, str] | JSONResponse:
        ex: Exchange = request.app.state.exchange
        try:
            why = await asyncio.wait_for(
                run_in_threadpool(readiness_problem, ex), ex.settings.ready_timeout_seconds
            )
        except TimeoutError:
            why = "the control-plane database does not answer in time"
        if why is not None:
            return problem(503, "not_ready", "Not ready", why)
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        # unauthenticated like health; labels carry route templates and codes, no identifiers
        return Response(render_metrics(), media_type=METRICS_CONTENT_TYPE)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/principals/me", response_model=PrincipalOut)
    def whoami(actor: Actor) -> PrincipalOut:
        return PrincipalOut.from_domain(actor)

    @v1.post("/principals", response_model=PrincipalOut, status_code=201)
    def register_principal(actor: Actor, ex: Ex, body: PrincipalIn) -> PrincipalOut:
        try:
            raw = b64url_decode(body.public_key)
        except EncodingError as exc:
            raise InvalidInputError("public_key must be unpadded base64url") from exc
        p = services.register_principal(
            ex, actor, body.name, body.kind, raw, jurisdiction=body.jurisdiction, ciio=body.ciio
        )
        return PrincipalOut.from_domain(p)

    @v1.get("/principals", response_model=list[PrincipalOut])
    def list_principals(actor: Actor, ex: Ex) -> list[PrincipalOut]:
        # all for the operator and auditors; a provider sees those active on its zones
        return [PrincipalOut.from_domain(p) for p in access.list_principals(ex, actor)]

    @v1.post("/principals/{key_id}/status", response_model=PrincipalOut)
    def set_status(key_id: str, actor: Actor, ex: Ex, body: StatusIn) -> PrincipalOut:
        return PrincipalOut.from_domain(
            services.set_principal_status(ex, actor, key_id, body.status)
        )

    @v1.post("/zones", response_model=ZoneOut, status_code=201)
    def create_zone(actor: Actor, ex: Ex, body: ZoneIn) -> ZoneOut:
        return ZoneOut.from_domain(services.create_zone(ex, actor, body.name, body.description))

    @v1.get("/catalog", response_model=CatalogOut)
    async def catalog(actor: Actor, request: Request, ex: Ex) -> Response:
        # the rendered document is cached per registry version: served as is while the
        # version this request was authenticated at is not newer
        version = registry_version(request)
        rendered: RenderedCatalog | None = ex.registry.peek(CATALOG_SNAPSHOT, version)
        if rendered is None:
            rendered = await run_in_threadpool(
                ex.registry.snapshot, CATALOG_SNAPSHOT, version, _render_catalog
            )
        # who was shown exactly which document is on the ledger, durably, before the answer
        # leaves: the first read of (principal, version, digest) in an interval appends a
        # catalog.read entry, the others wait for it if it is pending and are counted into
        # the interval's catalog.read.summary (exchange.server.readlog)
        await ex.catalog_reads.record(actor.key_id, rendered.version, rendered.digest)
        return Response(rendered.body, media_type="application/json")

    @v1.get("/zones/{zone}", response_model=ZoneOut)
    def get_zone(zone: str, actor: Actor, ex: Ex) -> ZoneOut:
        return ZoneOut.from_domain(services.get_zone(ex, actor, zone))

    @v1.post(
        "/zones/{zone}/uploads",
        response_model=UploadOut,
        status_code=201,
        openapi_extra=openapi_docs.DATASET_FILE_BODY,
    )
    async def upload(zone: str, request: Request, actor: Actor, ex: Ex) -> UploadOut:
        body = await request.body()
        media = request.headers.get("content-type", "")
        out = await run_in_threadpool(services.stage_upload, ex, actor, zone, media, body)
        return UploadOut.model_validate(out)

    @v1.post("/zones/{zone}/datasets", response_model=DatasetOut, status_code=201)
    def register_dataset(zone: str, actor: Actor, ex: Ex, body: DatasetIn) -> DatasetOut:
        spec = services.DatasetSpec(
            name=body.name,
            description=body.description,
            subject_column=body.subject_column,
            levels=body.levels,
            pi=body.pi,
            upload_id=body.upload_id,
            attach_url=body.attach.url if body.attach else None,
            attach_table=body.attach.table if body.attach else None,
            csv=services.csv_options(body.csv.model_dump()) if body.csv else None,
        )
        return DatasetOut.from_domain(services.register_dataset(ex, actor, zone, spec))

    @v1.get("/zones/{zone}/datasets/{name}", response_model=DatasetOut)
    def get_dataset(zone: str, name: str, actor: Actor, ex: Ex) -> DatasetOut:
        return DatasetOut.from_domain(services.get_dataset(ex, actor, zone, name))

    # -- access workflow ---------------------------------------------------------------------

    @v1.post("/access-requests", response_model=AccessRequestOut, status_code=201)
    def file_request(actor: Actor, ex: Ex, body: AccessRequestIn) -> AccessRequestOut:
        r = access.file_request(
            ex,
            actor,
            body.zone,
            body.datasets,
            body.operations,
            body.purpose,
            body.duration_seconds,
            body.justification,
        )
        return AccessRequestOut.from_domain(r)

    @v1.get("/access-requests", response_model=list[AccessRequestOut])
    def list_requests(
        actor: Actor,
        ex: Ex,
        zone: Annotated[str | None, Query(max_length=63)] = None,
        status: Annotated[str | None, Query(max_length=20)] = None,
    ) -> list[AccessRequestOut]:
        found = access.list_requests(ex, actor, zone=zone, status=status)
        return [AccessRequestOut.from_domain(r) for r in found]

    @v1.get("/access-requests/{request_id}", response_model=AccessRequestOut)
    def get_request(request_id: str, actor: Actor, ex: Ex) -> AccessRequestOut:
        return AccessRequestOut.from_domain(access.get_request(ex, actor, request_id))

    @v1.post("/access-requests/{request_id}/approve", response_model=AccessRequestOut)
    def approve(request_id: str, actor: Actor, ex: Ex, body: ApproveIn) -> AccessRequestOut:
        return AccessRequestOut.from_domain(
            access.approve_request(ex, actor, request_id, body.approval)
        )

    @v1.post("/access-requests/{request_id}/reject", response_model=AccessRequestOut)
    def reject(request_id: str, actor: Actor, ex: Ex, body: ReasonIn) -> AccessRequestOut:
        return AccessRequestOut.from_domain(
            access.reject_request(ex, actor, request_id, body.reason)
        )

    @v1.get("/grants", response_model=list[GrantOut])
    def list_grants(
        actor: Actor,
        ex: Ex,
        zone: Annotated[str | None, Query(max_length=63)] = None,
        all: bool = False,
    ) -> list[GrantOut]:
        found = access.list_grants(ex, actor, zone=zone, include_inactive=all)
        return [GrantOut.from_domain(g) for g in found]

    @v1.get("/grants/{grant_id}", response_model=GrantOut)
    def get_grant(grant_id: str, actor: Actor, ex: Ex) -> GrantOut:
        return GrantOut.from_domain(access.get_grant(ex, actor, grant_id))

    @v1.post("/grants/{grant_id}/revoke", response_model=GrantOut)
    def revoke(grant_id: str, actor: Actor, ex: Ex, body: ReasonIn) -> GrantOut:
        return GrantOut.from_domain(access.revoke_grant(ex, actor, grant_id, body.reason))

    @v1.post("/zones/{zone}/status", status_code=204)
    def set_zone_status(zone: str, actor: Actor, ex: Ex, body: StatusIn) -> None:
        access.set_zone_status(ex, actor, zone, body.status)

    @v1.put("/zones/{zone}/ceilings", response_model=CeilingsOut)
    def zone_ceilings(zone: str, actor: Actor, ex: Ex, body: CeilingsIn) -> CeilingsOut:
        return CeilingsOut(ceilings=access.set_ceilings(ex, actor, zone, body.ceilings))

    @v1.put("/zones/{zone}/datasets/{name}/ceilings", response_model=CeilingsOut)
    def dataset_ceilings(
        zone: str, name: str, actor: Actor, ex: Ex, body: CeilingsIn
    ) -> CeilingsOut:
        return CeilingsOut(
            ceilings=access.set_ceilings(ex, actor, zone, body.ceilings, dataset=name)
        )

    @v1.post("/zones/{zone}/consents", response_model=ConsentOut, status_code=201)
    def record_consent(zone: str, actor: Actor, ex: Ex, body: ConsentIn) -> ConsentOut:
        c = access.record_consent(
            ex,
            actor,
            zone,
            body.subject,
            body.consumer,
            body.purpose,
            body.expires_at,
            digest=body.subject_digest,
        )
        return ConsentOut.from_domain(c)

    @v1.post("/zones/{zone}/consents/import", response_model=ConsentImportOut, status_code=201)
    def import_consents(zone: str, actor: Actor, ex: Ex, body: ConsentImportIn) -> ConsentImportOut:
        """Record many consents in one call, all or nothing: every row is checked first; a
        refusal names the rows that are wrong (``errors``, by row index) and records nothing.
        Each consent gets its own ``consent.recorded`` ledger entry, in one transaction."""
        drafts = [
            access.ConsentDraft(c.subject, c.consumer, c.purpose, c.expires_at, c.subject_digest)
            for c in body.consents
        ]
        found = access.import_consents(ex, actor, zone, drafts)
        return ConsentImportOut(zone=zone, recorded=len(found), ids=[c.id for c in found])

    @v1.get("/zones/{zone}/consents", response_model=list[ConsentOut])
    def list_consents(zone: str, actor: Actor, ex: Ex) -> list[ConsentOut]:
        return [ConsentOut.from_domain(c) for c in access.list_consents(ex, actor, zone)]

    @v1.post("/consents/{consent_id}/withdraw", response_model=ConsentOut)
    def withdraw_consent(consent_id: str, actor: Actor, ex: Ex) -> ConsentOut:
        return ConsentOut.from_domain(access.withdraw_consent(ex, actor, consent_id))

    # -- analysis rules and budgets -----------------------------------------------------------

    @v1.get("/zones/{zone}/datasets/{name}/analysis-rules", response_model=RulesOut)
    def get_rules(zone: str, name: str, actor: Actor, ex: Ex) -> RulesOut:
        return RulesOut.model_validate(rules.get_rules(ex, actor, zone, name))

    @v1.put("/zones/{zone}/datasets/{name}/analysis-rules", response_model=RulesOut)
    def set_rules(zone: str, name: str, actor: Actor, ex: Ex, body: RulesIn) -> RulesOut:
        return RulesOut.model_validate(rules.set_rules(ex, actor, zone, name, body.rules))

    @v1.get("/budgets", response_model=list[BudgetOut])
    def budgets(
        actor: Actor, ex: Ex, zone: Annotated[str | None, Query(max_length=63)] = None
    ) -> list[BudgetOut]:
        return [BudgetOut.model_validate(b) for b in aggregate.budget_status(ex, actor, zone)]

    # -- computations ------------------------------------------------------------------------

    @v1.post("/zones/{zone}/aggregate", response_model=ComputationOut)
    def run_aggregate(
        zone: str, actor: Actor, request: Request, ex: Ex, body: AggregateIn
    ) -> ComputationOut:
        with observe_computation("aggregate"):
            # the zone's datasets and rules as of the version this request was authenticated
            # at, from the registry cache when nothing changed since
            out = aggregate.run_aggregate(
                ex,
                actor,
                zone,
                body.sql,
                body.purpose,
                epsilon=body.epsilon,
                registry_version=registry_version(request),
            )
        return ComputationOut.model_validate(out)

    @v1.post("/zones/{zone}/datasets/{name}/export", response_model=ExportOut)
    def export(zone: str, name: str, actor: Actor, ex: Ex, body: PurposeIn) -> ExportOut:
        with observe_computation("export"):
            out = export_rows(ex, actor, zone, name, body.purpose)
        return ExportOut.model_validate(out)

    @v1.get("/log/proof/inclusion", response_model=InclusionProofOut)
    def inclusion(
        actor: Actor, ex: Ex, seq: Annotated[int, Query(ge=0)], size: Annotated[int, Query(ge=1)]
    ) -> InclusionProofOut:
        proof = ex.ledger.inclusion_proof(seq, size)
        return InclusionProofOut(
            seq=seq,
            size=size,
            leaf_hash=b64_encode(leaf_hash(ex.ledger.entry(seq))),
            proof=[b64_encode(h) for h in proof],
        )

    @v1.get("/log/proof/consistency", response_model=ConsistencyProofOut)
    def consistency(
        actor: Actor,
        ex: Ex,
        size1: Annotated[int, Query(ge=0)],
        size2: Annotated[int, Query(ge=0)],
    ) -> ConsistencyProofOut:
        proof = ex.ledger.consistency_proof(size1, size2)
        return ConsistencyProofOut(size1=size1, size2=size2, proof=[b64_encode(h) for h in proof])

    @v1.get("/log/entries/{seq}", response_model=EntryOut)
    def entry(seq: int, actor: Actor, ex: Ex) -> EntryOut:
        if actor.kind not in (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR):
            raise ForbiddenError("only the operator and auditors read ledger entries")
        try:
            body = ex.ledger.entry(seq)
        except InvalidInputError as exc:
            raise NotFoundError("no such entry") from exc
        return EntryOut(seq=seq, entry=body.decode("utf-8"))

    app.include_router(v1)
    app.include_router(psi_routes.router)
    app.include_router(he_routes.router)
    app.include_router(log_routes.router)
    app.include_router(tile_routes.router)
    app.include_router(dataset_routes.router)
    app.include_router(node_routes.router)
    app.include_router(chain_routes.router)
    app.include_router(report_routes.router)
    app.include_router(incident_routes.router)
    app.include_router(incident_routes.principals_router)
    app.include_router(xborder_routes.router)
    openapi_docs.install(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` workers: settings from ``ZONEX_DATA_DIR``."""
    from exchange.settings import get_settings

    return create_app(get_settings())
