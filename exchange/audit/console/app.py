"""The console's web application: server-rendered pages (Jinja2, autoescaped), htmx partials,
every asset served from the package. Routes are thin: they read a
:class:`~exchange.audit.console.bundle.LedgerBundle` or call an
:class:`~exchange.audit.console.operator.OperatorDesk`.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from crypto.note import NoteVerifier
from exchange.audit import AuditError
from exchange.audit.console.bundle import Filter, LedgerBundle
from exchange.audit.console.operator import OperatorDesk
from exchange.audit.console.receipts import MAX_FILE_BYTES, ReceiptCheck, check_receipt
from exchange.audit.console.reports import ReportDesk
from exchange.audit.console.security import (
    CsrfError,
    allowed_hosts,
    check_post,
    host_name,
    is_loopback,
    new_token,
)
from exchange.client.sdk import ApiError

STATIC = Path(__file__).parent / "static"

#: no script, style or connection from anywhere but the console itself
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: a whole report page: its own <style>, inline SVG, nothing else
REPORT_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class ConsoleState:
    """What the console's pages read: an opened bundle and its log key (the auditor's pages),
    an operator's desk (the operator's pages), the process's form token."""

    bundle: LedgerBundle | None
    log: NoteVerifier | None
    desk: OperatorDesk | None
    reports: ReportDesk | None
    token: str
    bind: str
    hosts: frozenset[str]
    templates: Environment = field(repr=False)

    @property
    def local_paths(self) -> bool:
        """Whether the receipt form may name files on this machine (a loopback console only)."""
        return is_loopback(self.bind)


def _environment() -> Environment:
    # autoescape everywhere: entries, names and messages are attacker-influenced text
    env = Environment(
        loader=PackageLoader("exchange.audit.console", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = lambda value, n=12: (
        str(value) if len(str(value)) <= n + 1 else str(value)[:n] + "…"
    )
    env.filters["hex"] = lambda value: value.hex()
    return env


def create_console_app(
    *,
    bundle: LedgerBundle | None = None,
    log: NoteVerifier | None = None,
    desk: OperatorDesk | None = None,
    bind: str = "127.0.0.1",
    token: str | None = None,
) -> FastAPI:
    """The console over an opened ``bundle`` (with its ``log`` key), an operator's ``desk``
    over the live exchange, or both. ``bind`` is the address it is served on (the ``Host``
    names it answers to follow from it, see :func:`~.security.allowed_hosts`)."""
    if bundle is None and desk is None:
        raise ValueError("the console needs a bundle (auditor) or an exchange (operator)")
    if bundle is not None and log is None:
        log = bundle.log
    state = ConsoleState(
        bundle=bundle,
        log=log,
        desk=desk,
        reports=None if bundle is None else ReportDesk(bundle),
        token=token or new_token(),
        bind=bind,
        hosts=allowed_hosts(bind),
        templates=_environment(),
    )
    app = FastAPI(title="zonex console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = state
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # a name that is not the console's own (DNS rebinding) gets nothing
        if host_name(request.headers.get("host", "")) not in state.hosts:
            response: Response = HTMLResponse("unknown host", status_code=400)
        else:
            response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        page = state.templates.get_template(template).render(
            state=state, request=request, path=request.url.path, **context
        )
        return HTMLResponse(page, status_code=status, headers={"Vary": "HX-Request"})

    def partial(request: Request) -> bool:
        return (
            request.headers.get("hx-request") == "true"
            and request.headers.get("hx-history-restore-request") != "true"
        )

    def not_here(request: Request, what: str) -> HTMLResponse:
        return render(request, "error.html", 404, title="Not here", message=what)

    async def posted(request: Request) -> FormData:
        """The form of a POST that came from the console's own page (else :class:`CsrfError`),
        with its uploads read and closed."""
        form = await request.form(max_files=2, max_fields=20)
        try:
            check_post(
                request.headers, request.url.scheme, state.token, _str(form.get("csrf_token"))
            )
            fields: list[tuple[str, str | UploadFile]] = []
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read(MAX_FILE_BYTES + 1)
                    value = _Upload(value.filename or "", data)
                fields.append((name, value))
        finally:
            await form.close()
        return FormData(fields)

    @app.exception_handler(CsrfError)
    async def refused(request: Request, exc: CsrfError) -> HTMLResponse:
        return render(request, "error.html", 403, title="Refused", message=str(exc))

    # -- the auditor's pages --------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        if state.bundle is None:
            return RedirectResponse("/approvals", status_code=303)
        return render(request, "overview.html", bundle=state.bundle)

    @app.get("/entries", response_class=HTMLResponse)
    def entries(
        request: Request, kind: str = "", actor: str = "", zone: str = "", page: int = 1
    ) -> HTMLResponse:
        if state.bundle is None:
            return not_here(request, "no bundle is open: start the console with --bundle")
        where = Filter(kind=kind.strip(), actor=actor.strip(), zone=zone.strip())
        found = state.bundle.page(where, page)
        template = "_entries.html" if partial(request) else "entries.html"
        return render(request, template, bundle=state.bundle, where=where, found=found)

    @app.get("/entries/{seq}", response_class=HTMLResponse)
    def entry(request: Request, seq: int) -> HTMLResponse:
        if state.bundle is None:
            return not_here(request, "no bundle is open: start the console with --bundle")
        if not 0 <= seq < len(state.bundle.entries):
            return not_here(request, f"the bundle has no entry {seq}")
        return render(request, "entry.html", detail=state.bundle.detail(seq))

    @app.get("/receipt", response_class=HTMLResponse)
    def receipt_form(request: Request) -> HTMLResponse:
        return render(request, "receipt.html", check=None)

    @app.post("/receipt", response_class=HTMLResponse)
    async def receipt_check(request: Request) -> HTMLResponse:
        form = await posted(request)
        check = await _receipt(state, form)
        template = "_receipt_result.html" if partial(request) else "receipt.html"
        status = 200 if check.ok else 422
        return render(request, template, status, check=check)

    @app.get("/reports", response_class=HTMLResponse)
    async def reports(request: Request, period: str = "") -> HTMLResponse:
        if state.reports is None:
            return not_here(request, "no bundle is open: start the console with --bundle")
        template = "_report.html" if partial(request) else "reports.html"
        period = period.strip()
        if not period:
            return render(request, template, period="", shown=None, problem=None)
        try:
            shown = await run_in_threadpool(state.reports.get, period)
        except (ValueError, AuditError) as exc:
            problem = (
                f"reports are computed only from a bundle that verifies ({exc})"
                if isinstance(exc, AuditError)
                else str(exc)
            )
            return render(request, template, 422, period=period, shown=None, problem=problem)
        return render(request, template, period=period, shown=shown, problem=None)

    @app.get("/reports/{period}.html", response_class=HTMLResponse)
    async def report_page(request: Request, period: str) -> HTMLResponse:
        if state.reports is None:
            return not_here(request, "no bundle is open: start the console with --bundle")
        try:
            page = await run_in_threadpool(state.reports.html, period)
        except (ValueError, AuditError) as exc:
            return render(request, "error.html", 422, title="No report", message=str(exc))
        # the report is one self-contained page with its own stylesheet and no script
        policy = REPORT_POLICY
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    # -- the operator's pages -------------------------------------------------------------

    def operator_page(
        request: Request, template: str, load: Callable[[OperatorDesk], Any], **context: Any
    ) -> HTMLResponse:
        desk = state.desk
        if desk is None:
            return not_here(request, "no exchange: start the console with --exchange and --key")
        status, problem, rows = 200, context.pop("problem", None), None
        try:
            rows = load(desk)
        except ApiError as exc:
            status, problem = 502, _problem(exc)
        done = context.pop("done", None)
        return render(request, template, status, rows=rows, problem=problem, done=done, **context)

    async def act(
        request: Request,
        template: str,
        load: Callable[[OperatorDesk], Any],
        do: Callable[[OperatorDesk, FormData], str],
    ) -> HTMLResponse:
        form = await posted(request)
        if state.desk is None:
            return not_here(request, "no exchange: start the console with --exchange and --key")
        desk = state.desk
        try:
            done = await run_in_threadpool(do, desk, form)
        except ApiError as exc:
            page = await run_in_threadpool(
                operator_page, request, template, load, problem=_problem(exc)
            )
            page.status_code = 422 if page.status_code == 200 else page.status_code
            return page
        except ValueError as exc:
            return render(request, "error.html", 422, title="Refused", message=str(exc))
        return await run_in_threadpool(operator_page, request, template, load, done=done)

    def load_approvals(desk: OperatorDesk) -> Any:
        return desk.pending_approvals()

    def load_principals(desk: OperatorDesk) -> Any:
        return desk.principals()

    def load_zones(desk: OperatorDesk) -> Any:
        return desk.zones()

    @app.get("/approvals", response_class=HTMLResponse)
    def approvals(request: Request) -> HTMLResponse:
        return operator_page(request, "approvals.html", load_approvals)

    @app.post("/approvals/{request_id}/approve", response_class=HTMLResponse)
    async def approve(request: Request, request_id: str) -> HTMLResponse:
        def do(desk: OperatorDesk, form: FormData) -> str:
            r = desk.approve(request_id)
            return f"request {r.id} approved: grant {r['grant_id']}"

        return await act(request, "approvals.html", load_approvals, do)

    @app.post("/approvals/{request_id}/reject", response_class=HTMLResponse)
    async def reject(request: Request, request_id: str) -> HTMLResponse:
        def do(desk: OperatorDesk, form: FormData) -> str:
            reason = (_str(form.get("reason")) or "").strip()
            if not reason:
                raise ValueError("a rejection needs a reason")
            r = desk.reject(request_id, reason)
            return f"request {r.id} rejected"

        return await act(request, "approvals.html", load_approvals, do)

    @app.get("/principals", response_class=HTMLResponse)
    def principals(request: Request) -> HTMLResponse:
        return operator_page(request, "principals.html", load_principals)

    @app.post("/principals/{key_id}/status", response_class=HTMLResponse)
    async def principal_status(request: Request, key_id: str) -> HTMLResponse:
        def do(desk: OperatorDesk, form: FormData) -> str:
            status = _str(form.get("status")) or ""
            p = desk.set_principal_status(key_id, status)
            return f"principal {p['name']} is {p['status']}"

        return await act(request, "principals.html", load_principals, do)

    @app.get("/zones", response_class=HTMLResponse)
    def zones(request: Request) -> HTMLResponse:
        return operator_page(request, "zones.html", load_zones)

    @app.post("/zones/{zone}/status", response_class=HTMLResponse)
    async def zone_status(request: Request, zone: str) -> HTMLResponse:
        def do(desk: OperatorDesk, form: FormData) -> str:
            status = _str(form.get("status")) or ""
            desk.set_zone_status(zone, status)
            return f"zone {zone} is {status}"

        return await act(request, "zones.html", load_zones, do)

    def load_incidents(desk: OperatorDesk) -> Any:
        return desk.incidents()

    @app.get("/incidents", response_class=HTMLResponse)
    def incidents(request: Request) -> HTMLResponse:
        return operator_page(request, "incidents.html", load_incidents)

    @app.post("/incidents/{incident_id}/label", response_class=HTMLResponse)
    async def label(request: Request, incident_id: str) -> HTMLResponse:
        def do(desk: OperatorDesk, form: FormData) -> str:
            value = _str(form.get("label"))
            if value not in ("true", "false"):
                raise ValueError("label an incident true or false")
            desk.label_incident(incident_id, value == "true")
            return f"incident {incident_id} labelled {value} positive"

        return await act(request, "incidents.html", load_incidents, do)

    return app


class _Upload(UploadFile):
    """An uploaded file already read (at most one byte past the limit) and closed."""

    def __init__(self, filename: str, data: bytes) -> None:
        super().__init__(io.BytesIO(b""), filename=filename)
        self.data = data


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _problem(exc: ApiError) -> str:
    return f"{exc.status} {exc.code}: {exc.detail}"


async def _file(form: FormData, name: str, path_field: str, local: bool) -> bytes | None:
    """A form's uploaded file ``name``, else the file at the path in ``path_field``."""
    upload = form.get(name)
    if isinstance(upload, _Upload) and upload.filename:
        data = upload.data
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"the {name} file is larger than {MAX_FILE_BYTES} bytes")
        return data
    given = (_str(form.get(path_field)) or "").strip()
    if not given:
        return None
    if not local:
        raise ValueError("paths on this machine are only read by a console bound to loopback")
    path = Path(given).expanduser()
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None


async def _receipt(state: ConsoleState, form: FormData) -> ReceiptCheck:
    if state.log is None:
        return ReceiptCheck(False, "no log key: start the console with --log-key log.pub")
    try:
        receipt = await _file(form, "receipt", "receipt_path", state.local_paths)
        result = await _file(form, "result", "result_path", state.local_paths)
    except ValueError as exc:
        return ReceiptCheck(False, str(exc))
    if receipt is None:
        return ReceiptCheck(False, "give a receipt: drop its file, choose it, or name its path")
    return await run_in_threadpool(check_receipt, receipt, result, state.log, state.bundle)
