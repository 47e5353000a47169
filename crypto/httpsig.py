"""RFC 9421 HTTP Message Signatures (ed25519) with RFC 9530 Content-Digest. Pure functions.

zonex signs ("@method" "@target-uri" "content-digest") with created, nonce, keyid and
alg="ed25519" under the label ``sig1``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey, VerifyKey

DEFAULT_COMPONENTS = ("@method", "@target-uri", "content-digest")


class HttpSignatureError(VerificationError):
    """``reason``: missing, malformed, components, stale, bad_signature, digest_mismatch."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True)
class SignatureInput:
    label: str
    components: tuple[str, ...]
    created: int
    keyid: str
    nonce: str | None
    alg: str | None
    expires: int | None
    params_text: str


# -- RFC 8941 structured fields (the subset these headers use) --------------------------------

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_INT = re.compile(r"-?[0-9]{1,15}")
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")
_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')

Bare = str | int | bool | bytes


def _bare(text: str, pos: int) -> tuple[Bare, int]:
    if text.startswith('"', pos):
        m = _STRING.match(text, pos)
        if not m:
            raise HttpSignatureError("malformed", "bad string")
        return re.sub(r"\\(.)", r"\1", m.group(1)), m.end()
    if text.startswith(":", pos):
        m = _BYTES.match(text, pos)
        if not m:
            raise HttpSignatureError("malformed", "bad byte sequence")
        try:
            return b64_decode(m.group(1)), m.end()
        except EncodingError as exc:
            raise HttpSignatureError("malformed", "bad byte sequence") from exc
    if text.startswith("?", pos):
        if text[pos + 1 : pos + 2] in ("0", "1"):
            return text[pos + 1] == "1", pos + 2
        raise HttpSignatureError("malformed", "bad boolean")
    m = _INT.match(text, pos)
    if m and not (m.end() < len(text) and text[m.end()] == "."):
        return int(m.group()), m.end()
    m = _TOKEN.match(text, pos)
    if m:
        return m.group(), m.end()
    raise HttpSignatureError("malformed", "bad item")


def _params(text: str, pos: int) -> tuple[dict[str, Bare], int]:
    params: dict[str, Bare] = {}
    while pos < len(text) and text[pos] == ";":
        pos += 1
        while text.startswith(" ", pos):
            pos += 1
        m = _KEY.match(text, pos)
        if not m:
            raise HttpSignatureError("malformed", "bad parameter key")
        key, pos = m.group(), m.end()
        value: Bare = True
        if text.startswith("=", pos):
            value, pos = _bare(text, pos + 1)
        if key in params:
            raise HttpSignatureError("malformed", "duplicate parameter")
        params[key] = value
    return params, pos


def _dictionary(text: str) -> dict[str, tuple[object, str]]:
    """Parse a dictionary; values are an item or an inner list, with their raw member text."""
    out: dict[str, tuple[object, str]] = {}
    pos, n = 0, len(text)
    while pos < n:
        m = _KEY.match(text, pos)
        if not m:
            raise HttpSignatureError("malformed", "bad dictionary key")
        key, pos = m.group(), m.end()
        if not text.startswith("=", pos):
            raise HttpSignatureError("malformed", "dictionary member without a value")
        pos += 1
        start = pos
        value: object
        if text.startswith("(", pos):
            pos += 1
            items: list[Bare] = []
            while True:
                while text.startswith(" ", pos):
                    pos += 1
                if text.startswith(")", pos):
                    pos += 1
                    break
                item, pos = _bare(text, pos)
                items.append(item)
                if pos < n and text[pos] not in " )":
                    raise HttpSignatureError("malformed", "bad inner list")
                if pos >= n:
                    raise HttpSignatureError("malformed", "unterminated inner list")
            params, pos = _params(text, pos)
            value = (tuple(items), params)
        else:
            item, pos = _bare(text, pos)
            params, pos = _params(text, pos)
            value = (item, params)
        raw = text[start:pos]
        if key in out:
            raise HttpSignatureError("malformed", "duplicate dictionary key")
        out[key] = (value, raw)
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n:
            if text[pos] != ",":
                raise HttpSignatureError("malformed", "expected ','")
            pos += 1
            while pos < n and text[pos] in " \t":
                pos += 1
            if pos >= n:
                raise HttpSignatureError("malformed", "trailing ','")
    return out


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        for k, v in headers.items():
            if k.lower() == lower:
                return v
    return value


# -- Content-Digest -------------------------------------------------------------------------


def content_digest(body: bytes) -> str:
    return f"sha-256=:{b64_encode(hashlib.sha256(body).digest())}:"


def verify_content_digest(header_value: str, body: bytes) -> None:
    members = _dictionary(header_value.strip())
    if "sha-256" not in members:
        raise HttpSignatureError("malformed", "content-digest has no sha-256 member")
    (value, _params_), _raw = members["sha-256"]  # type: ignore[misc]
    if not isinstance(value, bytes):
        raise HttpSignatureError("malformed", "content-digest sha-256 is not a byte sequence")
    if value != hashlib.sha256(body).digest():
        raise HttpSignatureError("digest_mismatch", "body does not match content-digest")


# -- signature base -------------------------------------------------------------------------


def _component(name: str, method: str, target_uri: str, headers: Mapping[str, str]) -> str:
    parts = urlsplit(target_uri)
    if name == "@method":
        return method.upper()
    if name == "@target-uri":
        return target_uri
    if name == "@authority":
        return parts.netloc.lower()
    if name == "@scheme":
        return parts.scheme.lower()
    if name == "@path":
        return parts.path or "/"
    if name == "@query":
        return "?" + parts.query
    if name == "@request-target":
        return (parts.path or "/") + ("?" + parts.query if parts.query else "")
    if name.startswith("@"):
        raise HttpSignatureError("components", f"unsupported derived component {name}")
    value = _header(headers, name)
    if value is None:
        raise HttpSignatureError("components", f"covered header {name} is missing")
    return value.strip()


def signature_base(
    method: str, target_uri: str, headers: Mapping[str, str], sig_input: SignatureInput
) -> bytes:
    lines = [
        f'"{name}": {_component(name, method, target_uri, headers)}'
        for name in sig_input.components
    ]
    lines.append(f'"@signature-params": {sig_input.params_text}')
    return "\n".join(lines).encode("utf-8")


def _params_text(
    components: Sequence[str], created: int, keyid: str, nonce: str | None, alg: str | None
) -> str:
    text = "(" + " ".join(f'"{c}"' for c in components) + f");created={created}"
    if nonce is not None:
        text += f';nonce="{nonce}"'
    text += f';keyid="{keyid}"'
    if alg is not None:
        text += f';alg="{alg}"'
    return text


def sign_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    key: SigningKey,
    *,
    created: int,
    nonce: str,
    label: str = "sig1",
) -> dict[str, str]:
    """The headers to add to a request: Content-Digest, Signature-Input, Signature."""
    digest = content_digest(body)
    params = _params_text(DEFAULT_COMPONENTS, created, key.key_id, nonce, "ed25519")
    sig_input = SignatureInput(label, DEFAULT_COMPONENTS, created, key.key_id, nonce, "ed25519", None, params)
    base = signature_base(method, url, {**headers, "content-digest": digest}, sig_input)
    signature = key.sign(base)
    return {
        "Content-Digest": digest,
        "Signature-Input": f"{label}={params}",
        "Signature": f"{label}=:{b64_encode(signature)}:",
    }


def parse_signature(
    headers: Mapping[str, str], label: str | None = None
) -> tuple[SignatureInput, bytes]:
    raw_input = _header(headers, "signature-input")
    raw_sig = _header(headers, "signature")
    if raw_input is None or raw_sig is None:
        raise HttpSignatureError("missing", "no signature")
    if len(raw_input) > 4096 or len(raw_sig) > 4096:
        raise HttpSignatureError("malformed", "signature headers too long")
    inputs = _dictionary(raw_input.strip())
    sigs = _dictionary(raw_sig.strip())
    if label is None:
        if len(inputs) != 1:
            raise HttpSignatureError("malformed", "expected exactly one signature")
        label = next(iter(inputs))
    if label not in inputs or label not in sigs:
        raise HttpSignatureError("malformed", f"no signature labelled {label}")
    (items, params), raw = inputs[label]  # type: ignore[misc]
    if not isinstance(items, tuple) or not all(isinstance(i, str) for i in items):
        raise HttpSignatureError("malformed", "signature input is not a list of components")
    if len(set(items)) != len(items):
        raise HttpSignatureError("malformed", "duplicate components")
    (sig, _sp), _ = sigs[label]  # type: ignore[misc]
    if not isinstance(sig, bytes):
        raise HttpSignatureError("malformed", "signature is not a byte sequence")
    created = params.get("created")
    keyid = params.get("keyid")
    nonce = params.get("nonce")
    alg = params.get("alg")
    expires = params.get("expires")
    if not isinstance(created, int) or isinstance(created, bool):
        raise HttpSignatureError("malformed", "created is required")
    if not isinstance(keyid, str) or not keyid:
        raise HttpSignatureError("malformed", "keyid is required")
    if nonce is not None and not isinstance(nonce, str):
        raise HttpSignatureError("malformed", "nonce must be a string")
    if alg is not None and not isinstance(alg, str):
        raise HttpSignatureError("malformed", "alg must be a string")
    if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
        raise HttpSignatureError("malformed", "expires must be an integer")
    return (
        SignatureInput(label, tuple(items), created, keyid, nonce, alg, expires, raw),
        sig,
    )


def verify_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    key: VerifyKey,
    *,
    now: int,
    max_skew: int = 300,
    required: Sequence[str] = DEFAULT_COMPONENTS,
) -> SignatureInput:
    """Verify a signed request fully; raise :class:`HttpSignatureError` with a reason."""
    sig_input, signature = parse_signature(headers)
    missing = [c for c in required if c not in sig_input.components]
    if missing:
        raise HttpSignatureError("components", f"signature does not cover {', '.join(missing)}")
    if sig_input.alg is not None and sig_input.alg != "ed25519":
        raise HttpSignatureError("malformed", "alg must be ed25519")
    if abs(now - sig_input.created) > max_skew:
        raise HttpSignatureError("stale", "created is outside the allowed skew")
    if sig_input.expires is not None and sig_input.expires < now:
        raise HttpSignatureError("stale", "signature expired")
    base = signature_base(method, url, headers, sig_input)
    try:
        key.verify(base, signature)
    except VerificationError as exc:
        raise HttpSignatureError("bad_signature", "signature does not verify") from exc
    digest = _header(headers, "content-digest")
    if digest is None:
        raise HttpSignatureError("components", "content-digest header is missing")
    verify_content_digest(digest, body)
    return sig_input
