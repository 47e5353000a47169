"""Control-plane services: principals, zones, uploads, datasets, catalog.

Services own their transactions (through the ledger: each state change is applied inside the
batch that records it). They take the authenticated principal as ``actor`` and know nothing
about HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from crypto.errors import EncodingError
from crypto.keys import SigningKey, VerifyKey
from exchange.domain import (
    PRINCIPAL_NAME_RE,
    PROVIDER_KINDS,
    Column,
    Dataset,
    Principal,
    PrincipalKind,
    Zone,
    check_dataset_name,
    check_zone_name,
    leveled_columns,
)
from exchange.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from exchange.keyfile import write_private_key
from exchange.node.store import (
    CsvOptions,
    TableInfo,
    ZoneStore,
    ZoneStoreError,
    attach,
    row_count_band,
)
from exchange.server.access import principal_suspension
from exchange.server.incidents import use_reinstatement_approval
from exchange.server.ledger import EntryDraft
from exchange.server.models import AnalysisRulesRow, DatasetRow, PrincipalRow, UploadRow, ZoneRow
from exchange.server.registry import to_principal
from exchange.server.runtime import Exchange
from policy.levels import Level, max_level
from policy.xborder import is_jurisdiction

_LEVEL_NAMES = frozenset(lv.value for lv in Level)

UPLOAD_TYPES = {"text/csv": "csv", "application/vnd.apache.parquet": "parquet"}
#: a dataset's status once its provider retired it: no computations, not in the catalog
RETIRED = "retired"


# -- mapping rows to domain objects -----------------------------------------------------------


def to_dataset(row: DatasetRow, *, exact_release: bool = False) -> Dataset:
    return Dataset(
        zone=row.zone,
        name=row.name,
        description=row.description,
        subject_column=row.subject_column,
        columns=tuple(
            Column(c["name"], c["type"], c["level"], c.get("pi", "none")) for c in row.columns
        ),
        level=row.level,
        row_count=row.row_count,
        digest=row.digest,
        source=row.source,
        created_at=row.created_at,
        exact_release=exact_release,
    )


def exact_releases(session: Session, zone: str | None = None) -> set[tuple[str, str]]:
    """(zone, dataset) of every dataset (of ``zone``) whose rules in force set
    ``exact_release``: the provider's opt-out from DP by default, which the catalog shows."""
    rules = AnalysisRulesRow
    latest = select(rules.zone, rules.dataset, func.max(rules.version).label("version"))
    if zone is not None:
        latest = latest.where(rules.zone == zone)
    newest = latest.group_by(rules.zone, rules.dataset).subquery()
    found = session.execute(
        select(rules.zone, rules.dataset, rules.rules).join(
            newest,
            and_(
                rules.zone == newest.c.zone,
                rules.dataset == newest.c.dataset,
                rules.version == newest.c.version,
            ),
        )
    )
    return {(z, d) for z, d, body in found if isinstance(body, dict) and body.get("exact_release")}


# -- principals -------------------------------------------------------------------------------


def get_principal(ex: Exchange, key_id: str) -> Principal | None:
    with Session(ex.engine) as session:
        row = session.get(PrincipalRow, key_id)
        return None if row is None else to_principal(row)


def _require_operator(actor: Principal) -> None:
    if actor.kind is not PrincipalKind.OPERATOR:
        raise ForbiddenError("only the operator may do this")


def register_principal(
    ex: Exchange,
    actor: Principal,
    name: str,
    kind: str,
    public_key: bytes,
    *,
    jurisdiction: str | None = None,
    ciio: bool = False,
) -> Principal:
    """Register a principal (operator only). ``jurisdiction``: ISO 3166-1 alpha-2, default the
    operator's ``jurisdiction`` setting; ``ciio``: a critical information infrastructure
    operator (both decide cross-border flows, docs/cross-border.md)."""
    _require_operator(actor)
    where = ex.settings.jurisdiction if jurisdiction is None else jurisdiction
    if not is_jurisdiction(where):
        raise InvalidInputError(
            f"jurisdiction {where!r} is not an ISO 3166-1 alpha-2 code (e.g. CN, US, HK)"
        )
    if not PRINCIPAL_NAME_RE.fullmatch(name):
        raise InvalidInputError("principal names are 1-128 letters, digits, spaces and ._()-")
    try:
        principal_kind = PrincipalKind(kind)
    except ValueError as exc:
        raise InvalidInputError(f"unknown principal kind {kind!r}") from exc
    if principal_kind is PrincipalKind.OPERATOR:
        raise InvalidInputError("there is exactly one operator")
    try:
        key = VerifyKey(public_key)
    except EncodingError as exc:
        raise InvalidInputError(f"public key: {exc}") from exc

    def apply(session: Session, draft: EntryDraft) -> Principal:
        if session.get(PrincipalRow, key.key_id) is not None:
            raise ConflictError("a principal with this key is already registered")
        if session.execute(select(PrincipalRow).where(PrincipalRow.name == name)).first():
            raise ConflictError(f"a principal named {name!r} already exists")
        row = PrincipalRow(
            key_id=key.key_id,
            name=name,
            kind=principal_kind.value,
            public_key=key.raw,
            status="active",
            registered_by=actor.key_id,
            jurisdiction=where,
            ciio=ciio,
        )
        session.add(row)
        session.flush()
        return to_principal(row)

    draft = EntryDraft(
        kind="principal.registered",
        actor=actor.key_id,
        refs={"principal": key.key_id},
        attrs={"kind": principal_kind.value, "jurisdiction": where, "ciio": int(ciio)},
        digests={"name": hashlib.sha256(name.encode()).hexdigest()},
    )
    result: Principal = ex.ledger.append(draft, apply).value
    return result


def set_principal_status(ex: Exchange, actor: Principal, key_id: str, status: str) -> Principal:
    """Suspend or reinstate a principal; effective on its next call. Reinstating a principal
    the monitor suspended needs a second person's approval (:mod:`exchange.server.incidents`)."""
    _require_operator(actor)
    if status not in ("active", "suspended"):
        raise InvalidInputError("status is 'active' or 'suspended'")

    def apply(session: Session, draft: EntryDraft) -> Principal:
        row = session.get(PrincipalRow, key_id)
        if row is None:
            raise NotFoundError("no such principal")
        if row.kind == PrincipalKind.OPERATOR:
            raise ForbiddenError("the operator cannot be suspended")
        if status == "active" and row.status == "suspended":
            approval = use_reinstatement_approval(session, actor, key_id)
            if approval is not None:
                draft.refs["approval"] = approval
        row.status = status
        principal_suspension(session, key_id, status == "suspended")
        session.flush()
        return to_principal(row)

    kind = "principal.suspended" if status == "suspended" else "principal.reinstated"
    draft = EntryDraft(kind=kind, actor=actor.key_id, refs={"principal": key_id})
    result: Principal = ex.ledger.append(draft, apply).value
    ex.policy.refresh()
    return result


# -- zones ------------------------------------------------------------------------------------


def _zone_row(session: Session, name: str) -> ZoneRow:
    row = session.get(ZoneRow, name)
    if row is None:
        raise NotFoundError(f"no zone {name!r}")
    return row


def _require_owner(row: ZoneRow, actor: Principal) -> None:
    if row.owner != actor.key_id:
        raise ForbiddenError("only the zone's provider may do this")
    if row.status != "active":
        raise ForbiddenError("the zone is suspended")


def create_zone(ex: Exchange, actor: Principal, name: str, description: str) -> Zone:
    if actor.kind not in PROVIDER_KINDS:
        raise ForbiddenError("only agencies and enterprises own zones")
    check_zone_name(name)
    if len(description) > 4000:
        raise InvalidInputError("description is at most 4000 characters")
    zone_dir = ex.zones_dir / name
    key = SigningKey.generate()

    def apply(session: Session, draft: EntryDraft) -> None:
        if session.get(ZoneRow, name) is not None:
            raise ConflictError(f"zone {name!r} already exists")
        session.add(
            ZoneRow(
                name=name,
                owner=actor.key_id,
                description=description,
                public_key=key.public_key.raw,
                status="active",
                ceilings={},
            )
        )
        draft.refs["zone_key"] = key.key_id
        # the zone's key is written inside the savepoint; a conflict leaves none behind
        zone_dir.mkdir(parents=True, exist_ok=True)
        if not (zone_dir / "zone.key").exists():
            write_private_key(zone_dir / "zone.key", key)

    draft = EntryDraft(kind="zone.created", actor=actor.key_id, refs={"zone": name})
    ex.ledger.append(draft, apply)
    return get_zone(ex, actor, name)


def get_zone(ex: Exchange, actor: Principal, name: str) -> Zone:
    with Session(ex.engine) as session:
        row = _zone_row(session, name)
        owner = session.get(PrincipalRow, row.owner)
        datasets = session.execute(
            select(DatasetRow)
            .where(DatasetRow.zone == name, DatasetRow.status != RETIRED)
            .order_by(DatasetRow.name)
        ).scalars()
        exact = exact_releases(session, name)
        return Zone(
            name=row.name,
            owner=row.owner,
            owner_name=owner.name if owner else "?",
            description=row.description,
            public_key=row.public_key,
            status=row.status,
            created_at=row.created_at,
            datasets=tuple(
                to_dataset(d, exact_release=(d.zone, d.name) in exact) for d in datasets
            ),
        )


def catalog(ex: Exchange, actor: Principal) -> list[Zone]:
    """Every zone with its datasets' metadata. Never a row."""
    with Session(ex.engine) as session:
        return load_catalog(session)


def load_catalog(session: Session) -> list[Zone]:
    """The catalog in four queries whatever the number of zones (zones, their owners, every
    dataset, the datasets whose rules opt out of DP by default), in the caller's transaction."""
    zones = session.execute(select(ZoneRow).order_by(ZoneRow.name)).scalars().all()
    owners = {z.owner for z in zones}
    names: dict[str, str] = {}
    if owners:
        query = select(PrincipalRow.key_id, PrincipalRow.name).where(
            PrincipalRow.key_id.in_(owners)
        )
        names = dict(session.execute(query).all())
    by_zone: dict[str, list[Dataset]] = {}
    exact = exact_releases(session)
    for d in session.execute(
        select(DatasetRow)
        .where(DatasetRow.status != RETIRED)
        .order_by(DatasetRow.zone, DatasetRow.name)
    ).scalars():
        by_zone.setdefault(d.zone, []).append(
            to_dataset(d, exact_release=(d.zone, d.name) in exact)
        )
    return [
        Zone(
            name=z.name,
            owner=z.owner,
            owner_name=names.get(z.owner, "?"),
            description=z.description,
            public_key=z.public_key,
            status=z.status,
            created_at=z.created_at,
            datasets=tuple(by_zone.get(z.name, ())),
        )
        for z in zones
    ]


def get_dataset(ex: Exchange, actor: Principal, zone: str, name: str) -> Dataset:
    with Session(ex.engine) as session:
        _zone_row(session, zone)
        row = session.execute(
            select(DatasetRow).where(DatasetRow.zone == zone, DatasetRow.name == name)
        ).scalar_one_or_none()
        if row is None:
            raise NotFoundError(f"no dataset {name!r} in zone {zone!r}")
        if row.status == RETIRED:
            raise NotFoundError(f"dataset {name!r} in zone {zone!r} was retired")
        return to_dataset(row, exact_release=(zone, name) in exact_releases(session, zone))


# -- uploads and datasets ---------------------------------------------------------------------


def stage_upload(
    ex: Exchange, actor: Principal, zone: str, media_type: str, body: bytes
) -> dict[str, str | int]:
    """Keep an uploaded CSV or Parquet file in staging until a dataset registration uses it."""
    fmt = UPLOAD_TYPES.get(media_type.split(";")[0].strip().lower())
    if fmt is None:
        raise UnsupportedMediaTypeError("upload text/csv or application/vnd.apache.parquet")
    if len(body) > ex.settings.max_upload_bytes:
        raise PayloadTooLargeError("upload exceeds the size limit")
    if not body:
        raise InvalidInputError("the upload is empty")
    with Session(ex.engine) as session:
        _require_owner(_zone_row(session, zone), actor)
    upload_id = secrets.token_hex(16)
    digest = hashlib.sha256(body).hexdigest()
    path = ex.staging_dir / upload_id
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(body)

    def apply(session: Session, draft: EntryDraft) -> None:
        session.add(
            UploadRow(
                id=upload_id,
                zone=zone,
                owner=actor.key_id,
                media_type=fmt,
                size=len(body),
                sha256=digest,
                used=False,
            )
        )

    draft = EntryDraft(
        kind="upload.received",
        actor=actor.key_id,
        refs={"zone": zone, "upload": upload_id},
        digests={"content": digest},
        attrs={"bytes": len(body), "format": fmt},
    )
    try:
        ex.ledger.append(draft, apply)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return {"upload_id": upload_id, "sha256": digest, "bytes": len(body), "format": fmt}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    subject_column: str
    levels: Mapping[str, str]
    upload_id: str | None = None
    attach_url: str | None = None
    attach_table: str | None = None
    #: how a CSV upload is written (delimiter, encoding, header renames); None: the defaults
    csv: CsvOptions | None = None
    #: column -> personal-information class (personal | sensitive); others are none
    pi: Mapping[str, str] = field(default_factory=dict)


def csv_options(given: Mapping[str, Any]) -> CsvOptions:
    """CSV import options from a request (``delimiter``, ``encoding``, ``rename``), checked."""
    options = CsvOptions(
        delimiter=str(given.get("delimiter", ",")),
        encoding=str(given.get("encoding", "utf-8")),
        rename=tuple((str(k), str(v)) for k, v in dict(given.get("rename") or {}).items()),
    )
    try:
        options.check()
    except ZoneStoreError as exc:
        raise InvalidInputError(str(exc), reason=exc.code) from exc
    return options


def _csv_only(options: CsvOptions | None, upload_format: str) -> None:
    if options is not None and upload_format != "csv":
        raise InvalidInputError("CSV options (delimiter, encoding, rename) apply to CSV uploads")


def _columns(info: TableInfo, spec: DatasetSpec) -> list[dict[str, str]]:
    return leveled_columns(
        [(c.name, c.type) for c in info.columns], spec.levels, spec.subject_column, spec.pi
    )


def register_dataset(ex: Exchange, actor: Principal, zone: str, spec: DatasetSpec) -> Dataset:
    """Register a dataset from a staged upload (imported into the zone's store) or an attached
    table (data stays where it is). Records the content's snapshot digest."""
    check_dataset_name(spec.name)
    if len(spec.description) > 4000:
        raise InvalidInputError("description is at most 4000 characters")
    if (spec.upload_id is None) == (spec.attach_url is None):
        raise InvalidInputError("give exactly one source: an upload id or an attach URL + table")
    with Session(ex.engine) as session:
        _require_owner(_zone_row(session, zone), actor)
        exists = session.execute(
            select(DatasetRow.status).where(DatasetRow.zone == zone, DatasetRow.name == spec.name)
        ).first()
        if exists and exists[0] == RETIRED:
            raise ConflictError(
                f"dataset {spec.name!r} in zone {zone!r} was retired; its name is not reused "
                "(the ledger and receipts name it): choose another name"
            )
        if exists:
            raise ConflictError(
                f"dataset {spec.name!r} already exists in zone {zone!r}; to replace its "
                f"content: zonex dataset publish {zone} {spec.name} --file FILE"
            )
        upload = None
        if spec.upload_id is not None:
            upload = session.get(UploadRow, spec.upload_id)
            if upload is None or upload.zone != zone or upload.owner != actor.key_id:
                raise NotFoundError("no such upload for this zone")
            if upload.used:
                raise ConflictError("this upload was already used")
            upload_format = upload.media_type

    store = ZoneStore(ex.zones_dir / zone)
    imported = False
    try:
        if spec.upload_id is not None:
            source_path = ex.staging_dir / spec.upload_id
            if store.has_table(spec.name):
                store.drop(spec.name)  # an orphan from an interrupted registration
            try:
                _csv_only(spec.csv, upload_format)
                if upload_format == "csv":
                    info = store.import_csv(spec.name, source_path, options=spec.csv)
                else:
                    info = store.import_parquet(spec.name, source_path)
            except ZoneStoreError as exc:
                raise InvalidInputError(str(exc), reason=exc.code) from exc
            imported = True
            source, fmt, url, table = "import", upload_format, None, None
        else:
            assert spec.attach_url is not None
            if not spec.attach_table:
                raise InvalidInputError("attach needs a table name")
            try:
                attached = attach(
                    spec.attach_url,
                    spec.attach_table,
                    allowed_prefixes=ex.settings.attach_allowed_prefixes,
                )
                info = attached.describe()
                attached.close()
            except ZoneStoreError as exc:
                if exc.code == "attach_refused":
                    raise ForbiddenError(str(exc)) from exc
                raise InvalidInputError(str(exc), reason=exc.code) from exc
            source, fmt, url, table = "attach", None, spec.attach_url, spec.attach_table
        columns = _columns(info, spec)
        level = max_level(Level(c["level"]) for c in columns).value

        def apply(session: Session, draft: EntryDraft) -> Dataset:
            if spec.upload_id is not None:
                up = session.get(UploadRow, spec.upload_id)
                if up is None or up.used:
                    raise ConflictError("this upload was already used")
                up.used = True
            row = DatasetRow(
                zone=zone,
                name=spec.name,
                description=spec.description,
                subject_column=spec.subject_column,
                columns=columns,
                level=level,
                row_count=info.row_count,
                digest=info.digest,
                source=source,
                source_format=fmt,
                attach_url=url,
                attach_table=table,
                ceilings={},
                status="active",
            )
            session.add(row)
            session.flush()
            return to_dataset(row)

        draft = EntryDraft(
            kind="dataset.registered",
            actor=actor.key_id,
            refs={"zone": zone, "dataset": spec.name},
            digests={"snapshot": info.digest},
            attrs={"level": level, "source": source},
        )
        dataset: Dataset = ex.ledger.append(draft, apply).value
    except BaseException:
        if imported:
            store.drop(spec.name)
        raise
    finally:
        store.close()
    if spec.upload_id is not None:
        (ex.staging_dir / spec.upload_id).unlink(missing_ok=True)
    return dataset


# -- datasets that change ---------------------------------------------------------------------


def _live_dataset(session: Session, zone: str, name: str) -> DatasetRow:
    row = session.execute(
        select(DatasetRow).where(DatasetRow.zone == zone, DatasetRow.name == name)
    ).scalar_one_or_none()
    if row is None:
        raise NotFoundError(f"no dataset {name!r} in zone {zone!r}")
    if row.status == RETIRED:
        raise ConflictError(f"dataset {zone}/{name} is retired")
    return row


@dataclass(frozen=True)
class SnapshotSpec:
    """A new snapshot of a registered dataset: the staged upload with its content, and the
    column levels that change (the others keep theirs)."""

    upload_id: str
    levels: Mapping[str, str]
    subject_column: str | None = None
    description: str | None = None
    csv: CsvOptions | None = None


def publish_snapshot(
    ex: Exchange, actor: Principal, zone: str, name: str, spec: SnapshotSpec
) -> Dataset:
    """Replace an imported dataset's content with a staged upload: a new snapshot digest,
    ledgered (``dataset.snapshot_published`` names the previous digest too).

    The columns stay the same (a different schema is a new dataset); levels, the subject
    column and the description stay unless given. Grants name the dataset, not a snapshot, so
    they carry over; every call is still decided on the levels in force. Receipts made under the
    previous snapshot keep verifying offline (they carry its digest and their own proof);
    caches of checked queries and statistics are keyed by the digest, so nothing computed on
    the previous snapshot is reused for the new one."""
    if spec.description is not None and len(spec.description) > 4000:
        raise InvalidInputError("description is at most 4000 characters")
    with Session(ex.engine) as session:
        _require_owner(_zone_row(session, zone), actor)
        current = _live_dataset(session, zone, name)
        if current.source != "import":
            raise InvalidInputError(
                f"dataset {zone}/{name} is an attached table, read in place: it has no "
                "uploaded snapshots"
            )
        upload = session.get(UploadRow, spec.upload_id)
        if upload is None or upload.zone != zone or upload.owner != actor.key_id:
            raise NotFoundError("no such upload for this zone")
        if upload.used:
            raise ConflictError("this upload was already used")
        upload_format = upload.media_type
        old_columns = [dict(c) for c in current.columns]
        old_digest = current.digest
        if spec.subject_column and spec.subject_column != current.subject_column:
            # the subject column is the privacy unit every k, budget and DP bound counts in
            raise InvalidInputError(
                f"a new snapshot keeps the subject column {current.subject_column!r}; "
                "another privacy unit is a new dataset",
                reason="subject_changed",
            )
        subject_column = current.subject_column
        description = current.description if spec.description is None else spec.description

    source_path = ex.staging_dir / spec.upload_id
    store = ZoneStore(ex.zones_dir / zone)
    result: list[Dataset] = []

    def publish(new_file: Path, info: TableInfo) -> None:
        names = [c.name for c in info.columns]
        before = [c["name"] for c in old_columns]
        if names != before:
            raise InvalidInputError(
                f"the new snapshot's columns ({', '.join(names)}) differ from {zone}/{name}'s "
                f"({', '.join(before)}); a different schema is a new dataset"
            )
        if info.digest == old_digest:
            raise ConflictError(f"this content is already the current snapshot of {zone}/{name}")
        levels = {c["name"]: c["level"] for c in old_columns}
        # 就高从严: a snapshot may raise a column's level, never lower it. A lower level would
        # loosen every live grant at once (an operator-approved IMPORTANT grant turning into
        # exact releases) without a new request or approval
        lowered = [
            f"{col} {levels[col]} -> {lv}"
            for col, lv in spec.levels.items()
            if col in levels and lv in _LEVEL_NAMES and Level(lv) < Level(levels[col])
        ]
        if lowered:
            raise InvalidInputError(
                f"a new snapshot never lowers a column's level ({', '.join(lowered)}); "
                "a lower classification is a new dataset, with new grants",
                reason="level_lowered",
            )
        levels.update(spec.levels)
        # personal-information classes carry over (a new snapshot has the same columns)
        classes = {c["name"]: c["pi"] for c in old_columns if c.get("pi", "none") != "none"}
        columns = _columns(
            info,
            DatasetSpec(
                name, description, subject_column, levels, upload_id=spec.upload_id, pi=classes
            ),
        )
        level = max_level(Level(c["level"]) for c in columns).value
        undo: list[Callable[[], None]] = []

        def apply(session: Session, draft: EntryDraft) -> Dataset:
            up = session.get(UploadRow, spec.upload_id)
            if up is None or up.used:
                raise ConflictError("this upload was already used")
            row = _live_dataset(session, zone, name)
            if row.digest != old_digest:
                raise ConflictError(f"{zone}/{name} changed meanwhile; publish again")
            up.used = True
            row.columns = columns
            row.level = level
            row.row_count = info.row_count
            row.digest = info.digest
            row.subject_column = subject_column
            row.description = description
            row.source_format = upload_format
            # the file is swapped inside the transaction that records it: whoever reads the
            # new digest reads the new rows
            undo.append(store.replace(name, new_file))
            session.flush()
            return to_dataset(row)

        draft = EntryDraft(
            kind="dataset.snapshot_published",
            actor=actor.key_id,
            refs={"zone": zone, "dataset": name},
            digests={"snapshot": info.digest, "previous": old_digest},
            attrs={"level": level, "rows_band": row_count_band(info.row_count)},
        )
        try:
            result.append(ex.ledger.append(draft, apply).value)
        except BaseException:
            for step in undo:
                step()
            raise

    try:
        try:
            _csv_only(spec.csv, upload_format)
            if upload_format == "csv":
                store.import_csv(name, source_path, options=spec.csv, publish=publish)
            else:
                store.import_parquet(name, source_path, publish=publish)
        except ZoneStoreError as exc:
            raise InvalidInputError(str(exc), reason=exc.code) from exc
        store.discard_previous()
    finally:
        store.close()
    source_path.unlink(missing_ok=True)
    return result[0]


def retire_dataset(ex: Exchange, actor: Principal, zone: str, name: str, reason: str) -> Dataset:
    """Retire a dataset for good: no computation runs on it any more (the policy point
    refuses with ``retired``), the catalog no longer lists it, its name is not reused, and an
    imported dataset's rows are removed from the zone's store. Ledgered (``dataset.retired``);
    receipts made on it keep verifying offline."""
    if len(reason) > 1000:
        raise InvalidInputError("reason is at most 1000 characters")
    with Session(ex.engine) as session:
        _require_owner(_zone_row(session, zone), actor)
        _live_dataset(session, zone, name)

    def apply(session: Session, draft: EntryDraft) -> Dataset:
        row = _live_dataset(session, zone, name)
        row.status = RETIRED
        draft.digests["snapshot"] = row.digest
        session.flush()
        return to_dataset(row)

    draft = EntryDraft(
        kind="dataset.retired",
        actor=actor.key_id,
        refs={"zone": zone, "dataset": name},
        digests={"reason": hashlib.sha256(reason.encode()).hexdigest()} if reason else {},
    )
    dataset: Dataset = ex.ledger.append(draft, apply).value
    if dataset.source == "import":
        with ZoneStore(ex.zones_dir / zone) as store, contextlib.suppress(ZoneStoreError):
            store.drop(name)  # the rows leave the zone; a missing file is already gone
    return dataset
