"""HE public contexts: uploaded once, referred to by digest, bounded in size, cached in memory.

A consumer's public context (public key and parameters, never a secret key, relinearization or
Galois keys; :func:`crypto.he.load_public_context` checks) is about half a megabyte at n = 8192.
Computations that encrypt under it (``psi_aggregate``, ``he_score``, ``secure_sum``) name it by
its SHA-256, so it crosses the wire once and every receipt can cite exactly which key the result
was encrypted for.

Stored content-addressed under ``DATA_DIR/contexts/<digest>`` (written to a temporary file and
renamed, so a reader never sees half a context); registering the same bytes again is a no-op.
Each process keeps parsed contexts in a least-recently-used cache bounded by
``settings.he_context_cache_bytes``. The registration is ledgered (``he.context_registered``)
with the digest and who uploaded it; the bytes are public by construction.

Ciphertext uploads (:func:`store_ciphertexts`): a key holder's encrypted model weights are a
few hundred kilobytes each, too large for a JSON body, so they travel once as a framed binary
batch (:func:`crypto.he.pack_ciphertexts`) bound to one context and one uploader, are checked
frame by frame under that context, and are then named by digest. They are kept under
``DATA_DIR/he/uploads`` for ``settings.upload_ttl_seconds``; only the uploader can use them.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto import he
from crypto.errors import CryptoError
from exchange.domain import Principal
from exchange.errors import InvalidInputError, NotFoundError
from exchange.server.ledger import EntryDraft
from exchange.server.runtime import Exchange

__all__ = [
    "CiphertextUpload",
    "ContextCache",
    "ContextInfo",
    "context_info",
    "load_ciphertexts",
    "load_context",
    "register_context",
    "store_ciphertexts",
]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: a parsed context holds NTT tables and the key in expanded form: count it at this multiple
#: of its serialized size when bounding the cache
_PARSED_COST = 4


@dataclass(frozen=True)
class ContextInfo:
    digest: str
    scheme: str
    parameter_set: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "scheme": self.scheme,
            "parameter_set": self.parameter_set,
            "size": self.size,
        }


def _name(params: he.ParameterSet) -> str:
    for name, known in he.PARAMETER_SETS.items():
        if known == params:
            return name
    raise InvalidInputError("the context uses parameters zonex does not offer")  # pragma: no cover


class ContextCache:
    """Parsed contexts by digest, least recently used evicted past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, digest: str) -> Any | None:
        with self._lock:
            item = self._items.get(digest)
            if item is None:
                return None
            self._items.move_to_end(digest)
            return item[0]

    def put(self, digest: str, ctx: Any, cost: int) -> None:
        with self._lock:
            if digest in self._items:
                return
            self._items[digest] = (ctx, cost)
            self._used += cost
            while self._used > self.limit and len(self._items) > 1:
                _, (_, old) = self._items.popitem(last=False)
                self._used -= old

    @property
    def used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._items)


#: one cache per exchange, gone with it (parsed contexts are large)
_caches: weakref.WeakKeyDictionary[Exchange, ContextCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _cache(ex: Exchange) -> ContextCache:
    with _caches_lock:
        cache = _caches.get(ex)
        if cache is None:
            cache = _caches[ex] = ContextCache(ex.settings.he_context_cache_bytes)
        return cache


def _dir(ex: Exchange) -> Path:
    path = ex.settings.data_dir / "contexts"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _parse(ex: Exchange, data: bytes, expected: he.ParameterSet | None) -> Any:
    try:
        return he.load_public_context(
            data, max_bytes=ex.settings.max_he_context_bytes, expected=expected
        )
    except CryptoError as exc:
        raise InvalidInputError(f"unusable HE context: {exc}", reason="bad_context") from exc


def register_context(ex: Exchange, actor: Principal, data: bytes) -> ContextInfo:
    """Check and store a public context; return its digest and parameters."""
    ctx = _parse(ex, data, None)
    params = he.parameters_of(ctx)
    digest = he.context_digest(data)
    info = ContextInfo(digest, params.scheme, _name(params), len(data))
    path = _dir(ex) / digest
    if not path.exists():
        tmp = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        ex.ledger.append(
            EntryDraft(
                kind="he.context_registered",
                actor=actor.key_id,
                digests={"context": digest},
                attrs={"parameter_set": info.parameter_set, "bytes": len(data)},
            )
        )
    _cache(ex).put(digest, ctx, len(data) * _PARSED_COST)
    return info


def _read(ex: Exchange, digest: str) -> bytes:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidInputError("a context digest is 64 lowercase hex digits")
    path = _dir(ex) / digest
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no HE context {digest[:16]}…; upload it first") from None


def context_info(ex: Exchange, digest: str) -> ContextInfo:
    data = _read(ex, digest)
    params = he.parameters_of(load_context(ex, digest))
    return ContextInfo(digest, params.scheme, _name(params), len(data))


def load_context(ex: Exchange, digest: str, expected: he.ParameterSet | None = None) -> Any:
    """The parsed public context ``digest``, from the cache or the store.

    ``expected`` pins the parameter set a computation needs (e.g. ``BFV_DEFAULT``); a context
    with other parameters is refused with ``bad_context``.
    """
    cache = _cache(ex)
    ctx = cache.get(digest)
    if ctx is None:
        data = _read(ex, digest)
        if he.context_digest(data) != digest:
            raise InvalidInputError("the stored context does not match its digest")
        ctx = _parse(ex, data, None)
        cache.put(digest, ctx, len(data) * _PARSED_COST)
    if expected is not None and he.parameters_of(ctx) != expected:
        raise InvalidInputError(
            f"this computation needs a {_name(expected)} context", reason="bad_context"
        )
    return ctx


# -- ciphertext uploads -----------------------------------------------------------------------


@dataclass(frozen=True)
class CiphertextUpload:
    digest: str
    context: str
    count: int
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "context": self.context,
            "count": self.count,
            "size": self.size,
        }


def _uploads(ex: Exchange) -> Path:
    path = ex.settings.data_dir / "he" / "uploads"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _sweep(directory: Path, ttl: int) -> None:
    """Delete uploads older than the TTL (best effort; another process may race us)."""
    cutoff = time.time() - ttl
    for entry in directory.iterdir():
        try:
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
        except OSError:
            continue


def store_ciphertexts(
    ex: Exchange, actor: Principal, context: str, data: bytes
) -> CiphertextUpload:
    """Check a framed batch of ciphertexts under the public context ``context`` and keep it.

    Every frame must load as a ciphertext of the context's scheme and exact parameters
    (:func:`crypto.he.load_ciphertext`, size-bounded); anything else refuses the whole batch.
    """
    settings = ex.settings
    if len(data) > settings.max_he_upload_bytes:
        raise InvalidInputError(
            f"a ciphertext upload is at most {settings.max_he_upload_bytes} bytes",
            reason="too_large",
        )
    ctx = load_context(ex, context)
    params = he.parameters_of(ctx)
    limit = he.max_ciphertext_bytes(params)
    try:
        items = he.unpack_ciphertexts(data, max_items=he.MAX_FEATURES, max_item_bytes=limit)
        for item in items:
            he.load_ciphertext(ctx, item, max_bytes=limit, kind=params.scheme)
    except CryptoError as exc:
        raise InvalidInputError(f"unusable ciphertext: {exc}", reason="bad_ciphertext") from exc
    digest = hashlib.sha256(data).hexdigest()
    directory = _uploads(ex)
    _sweep(directory, settings.upload_ttl_seconds)
    path = directory / f"{actor.key_id}.{context}.{digest}"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.touch()
    return CiphertextUpload(digest, context, len(items), len(data))


def load_ciphertexts(ex: Exchange, actor: Principal, context: str, digest: str) -> list[bytes]:
    """The frames of an upload the actor made under ``context`` (checked again by the caller's
    HE computation, which loads each under the context)."""
    for value, what in ((context, "context"), (digest, "upload")):
        if not isinstance(value, str) or not _DIGEST.match(value):
            raise InvalidInputError(f"a {what} digest is 64 lowercase hex digits")
    path = _uploads(ex) / f"{actor.key_id}.{context}.{digest}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"no ciphertext upload {digest[:16]}… of yours under context {context[:16]}…"
        ) from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise InvalidInputError("the stored upload does not match its digest")
    params = he.parameters_of(load_context(ex, context))
    return he.unpack_ciphertexts(
        data, max_items=he.MAX_FEATURES, max_item_bytes=he.max_ciphertext_bytes(params)
    )
