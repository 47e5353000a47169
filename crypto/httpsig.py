"""RFC 9421 HTTP Message Signatures (ed25519) with RFC 9530 Content-Digest. Pure functions.

Every zonex API request carries one signature, labelled ``sig1``, covering
("@method" "@target-uri" "content-digest") with the parameters created, nonce, keyid and
alg="ed25519". The verifier works in steps so that each rejection has its own reason for the
server log and the ledger; the caller of the API only ever sees one collapsed answer.

The structured fields (RFC 8941) are parsed by a small strict parser for the subset these headers
use. It is stricter than RFC 8941 in two ways, both deliberate: a repeated dictionary key or
parameter is refused instead of silently overwritten, and byte sequences must be canonical,
padded base64, so that no two header values can carry the same signature or digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey, VerifyKey

__all__ = [
    "DEFAULT_COMPONENTS",
    "MAX_FIELD_LENGTH",
    "HttpSignatureError",
    "Reason",
    "SignatureInput",
    "content_digest",
    "parse_signature",
    "sign_request",
    "signature_base",
    "verify_content_digest",
    "verify_request",
]

DEFAULT_COMPONENTS: tuple[str, ...] = ("@method", "@target-uri", "content-digest")
"""What every zonex request signature covers, in this order."""

MAX_FIELD_LENGTH = 4096
"""Longest Signature, Signature-Input or Content-Digest value accepted (characters)."""

Reason = Literal["missing", "malformed", "components", "stale", "bad_signature", "digest_mismatch"]


class HttpSignatureError(VerificationError):
    """A request signature or content digest was refused.

    ``reason`` is one of: ``missing`` (no signature headers), ``malformed`` (a header cannot be
    parsed or holds a value zonex does not accept), ``components`` (a required component is not
    covered, or a covered one is absent), ``stale`` (``created`` outside the allowed skew, or
    ``expires`` passed), ``bad_signature`` and ``digest_mismatch``.
    """

    def __init__(self, reason: Reason, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason: Reason = reason


@dataclass(frozen=True)
class SignatureInput:
    """One parsed member of Signature-Input.

    ``params_text`` is the member value exactly as received (the inner list of components and its
    parameters): it is the ``@signature-params`` line of the signature base, so it is never
    re-serialized.
    """

    label: str
    components: tuple[str, ...]
    created: int
    keyid: str
    nonce: str | None
    alg: str | None
    expires: int | None
    params_text: str


# -- RFC 8941 structured fields (the subset these headers use) --------------------------------


class _Token(str):
    """An sf-token, kept apart from an sf-string of the same characters."""

    __slots__ = ()


_Bare = str | int | bool | bytes
_Params = dict[str, _Bare]
_InnerList = tuple[tuple[_Bare, _Params], ...]

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_INTEGER = re.compile(r"-?[0-9]{1,15}")
_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_UNESCAPE = re.compile(r'\\(["\\])')
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")
_DIGITS = frozenset("0123456789")


def _malformed(message: str) -> HttpSignatureError:
    return HttpSignatureError("malformed", message)


def _bare(text: str, pos: int) -> tuple[_Bare, int]:
    first = text[pos : pos + 1]
    if first == '"':
        m = _STRING.match(text, pos)
        if not m:
            raise _malformed("bad string")
        return _UNESCAPE.sub(r"\1", m.group(1)), m.end()
    if first == ":":
        m = _BYTES.match(text, pos)
        if not m:
            raise _malformed("bad byte sequence")
        try:
            return b64_decode(m.group(1)), m.end()
        except EncodingError as exc:
            raise _malformed("byte sequence is not canonical base64") from exc
    if first == "?":
        flag = text[pos + 1 : pos + 2]
        if flag not in ("0", "1"):
            raise _malformed("bad boolean")
        return flag == "1", pos + 2
    if first == "-" or first in _DIGITS:
        m = _INTEGER.match(text, pos)
        if not m:
            raise _malformed("bad integer")
        after = text[m.end() : m.end() + 1]
        if after == "." or after in _DIGITS:
            raise _malformed("decimals and integers over 15 digits are not accepted")
        return int(m.group()), m.end()
    m = _TOKEN.match(text, pos)
    if m:
        return _Token(m.group()), m.end()
    raise _malformed("bad item")


def _parameters(text: str, pos: int) -> tuple[_Params, int]:
    params: _Params = {}
    while text.startswith(";", pos):
        pos += 1
        while text.startswith(" ", pos):
            pos += 1
        m = _KEY.match(text, pos)
        if not m:
            raise _malformed("bad parameter key")
        key, pos = m.group(), m.end()
        value: _Bare = True
        if text.startswith("=", pos):
            value, pos = _bare(text, pos + 1)
        if key in params:
            raise _malformed(f"parameter {key} is repeated")
        params[key] = value
    return params, pos


def _inner_list(text: str, pos: int) -> tuple[_InnerList, int]:
    pos += 1  # "("
    items: list[tuple[_Bare, _Params]] = []
    while pos < len(text):
        while text.startswith(" ", pos):
            pos += 1
        if text.startswith(")", pos):
            return tuple(items), pos + 1
        item, pos = _bare(text, pos)
        params, pos = _parameters(text, pos)
        items.append((item, params))
        if not text.startswith((" ", ")"), pos):
            raise _malformed("bad inner list")
    raise _malformed("unterminated inner list")


@dataclass(frozen=True)
class _Member:
    value: _Bare | _InnerList
    params: _Params
    raw: str  # the member value as received: item or inner list, with its parameters


def _dictionary(text: str) -> dict[str, _Member]:
    """Parse an RFC 8941 dictionary (leading and trailing whitespace already removed)."""
    out: dict[str, _Member] = {}
    pos, n = 0, len(text)
    while pos < n:
        m = _KEY.match(text, pos)
        if not m:
            raise _malformed("bad dictionary key")
        key, pos = m.group(), m.end()
        value: _Bare | _InnerList = True
        if text.startswith("=", pos):
            pos += 1
            start = pos
            if text.startswith("(", pos):
                value, pos = _inner_list(text, pos)
            else:
                value, pos = _bare(text, pos)
        else:
            start = pos
        params, pos = _parameters(text, pos)
        if key in out:
            # RFC 8941 keeps the last one; two members for one key are refused here
            raise _malformed(f"dictionary key {key} is repeated")
        out[key] = _Member(value, params, text[start:pos])
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos == n:
            break
        if text[pos] != ",":
            raise _malformed("expected ',' between dictionary members")
        pos += 1
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos == n:
            raise _malformed("trailing ',' in dictionary")
    return out


def _parse_field(value: str) -> dict[str, _Member]:
    if len(value) > MAX_FIELD_LENGTH:
        raise _malformed("header value too long")
    return _dictionary(value.strip(" \t"))


def _sf_string(value: str) -> str:
    if not all("\x20" <= c <= "\x7e" for c in value):
        raise ValueError("an sf-string holds printable ASCII only")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fields(headers: Mapping[str, str], names: Collection[str]) -> dict[str, str]:
    """Look the lowercase ``names`` up case-insensitively, in one pass over ``headers``.

    A field that appears twice (two keys differing in case, or two raw lines from a multi-valued
    mapping) is refused: the caller combines repeated fields before verification.
    """
    found: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        if name in names:
            if name in found:
                raise _malformed(f"header {name} appears more than once")
            if not isinstance(value, str):
                raise _malformed(f"header {name} is not text")
            found[name] = value
    return found


# -- Content-Digest (RFC 9530) ----------------------------------------------------------------


def content_digest(body: bytes) -> str:
    """The Content-Digest value for ``body``: ``sha-256=:<base64>:``."""
    return f"sha-256=:{b64_encode(hashlib.sha256(body).digest())}:"


def verify_content_digest(header_value: str, body: bytes) -> None:
    """Check the ``sha-256`` member of a Content-Digest value against ``body``.

    Members for other algorithms are ignored; a missing or ill-formed ``sha-256`` member is
    ``malformed``, a different digest is ``digest_mismatch``.
    """
    member = _parse_field(header_value).get("sha-256")
    if member is None:
        raise _malformed("content-digest has no sha-256 member")
    if not isinstance(member.value, bytes) or member.params or len(member.value) != 32:
        raise _malformed("content-digest sha-256 is not a 32-byte byte sequence")
    if not hmac.compare_digest(member.value, hashlib.sha256(body).digest()):
        raise HttpSignatureError("digest_mismatch", "body does not match content-digest")


# -- signature base ---------------------------------------------------------------------------

_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_URI = re.compile(r"[\x21-\x7e]+")
_DERIVED_VALUE = re.compile(r"[\x20-\x7e]*")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_FIELD_NAME = re.compile(r"[a-z0-9!#$%&'*+\-.^_`|~]+")
_DERIVED_NAME = re.compile(r"@[a-z][a-z0-9-]*")
_DEFAULT_PORT = {"http": ":80", "https": ":443"}


class _Target:
    """The parts of a target URI, split once and only if a covered component needs them."""

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        self.scheme = parts.scheme.lower()
        self.netloc = parts.netloc
        self.path = parts.path or "/"
        before_fragment = uri.partition("#")[0]
        self.query = before_fragment.partition("?")[2] if "?" in before_fragment else None


def _derived(name: str, method: str, target_uri: str, target: _Target | None) -> str:
    if name == "@method":
        if not _METHOD.fullmatch(method):
            raise _malformed("method is not an HTTP token")
        return method  # case-sensitive: never normalized (RFC 9421 section 2.2.1)
    if name == "@target-uri":
        return target_uri
    if target is None:
        target = _Target(target_uri)
    if name == "@scheme":
        if not target.scheme:
            raise HttpSignatureError("components", "target URI has no scheme")
        return target.scheme
    if name == "@authority":
        if not target.netloc or "@" in target.netloc:
            raise HttpSignatureError("components", "target URI has no plain authority")
        authority = target.netloc.lower()
        default = _DEFAULT_PORT.get(target.scheme)
        if default and authority.endswith(default):
            authority = authority[: -len(default)]
        return authority
    if name == "@path":
        return target.path
    if name == "@query":
        return "?" + (target.query or "")
    if name == "@request-target":
        return target.path + ("" if target.query is None else "?" + target.query)
    raise HttpSignatureError("components", f"derived component {name} is not supported")


def signature_base(
    method: str, target_uri: str, headers: Mapping[str, str], sig_input: SignatureInput
) -> bytes:
    """The RFC 9421 signature base for a request (section 2.5), as ASCII bytes.

    Header fields are looked up case-insensitively; their values are trimmed, and repeated fields
    must already be combined by the caller. A covered component that is absent is ``components``.
    """
    if not _URI.fullmatch(target_uri):
        raise _malformed("target URI is not printable ASCII without spaces")
    target: _Target | None = None
    fields = _fields(headers, {c for c in sig_input.components if not c.startswith("@")})
    lines = []
    for name in sig_input.components:
        if name.startswith("@"):
            if target is None and name not in ("@method", "@target-uri"):
                target = _Target(target_uri)
            value = _derived(name, method, target_uri, target)
            if not _DERIVED_VALUE.fullmatch(value):
                raise _malformed(f"{name} is not printable ASCII")
        else:
            raw = fields.get(name)
            if raw is None:
                raise HttpSignatureError("components", f"covered header {name} is absent")
            value = raw.strip(" \t")
            # a newline here would forge a line of the signature base
            if not _FIELD_VALUE.fullmatch(value):
                raise _malformed(f"header {name} holds a newline, control or non-ASCII byte")
        lines.append(f'"{name}": {value}')
    if not _DERIVED_VALUE.fullmatch(sig_input.params_text):
        raise _malformed("signature parameters are not printable ASCII")
    lines.append(f'"@signature-params": {sig_input.params_text}')
    return "\n".join(lines).encode("ascii")


# -- signing ----------------------------------------------------------------------------------


def _params_text(components: Sequence[str], created: int, keyid: str, nonce: str, alg: str) -> str:
    inner = " ".join(_sf_string(c) for c in components)
    return (
        f"({inner});created={created};nonce={_sf_string(nonce)}"
        f";keyid={_sf_string(keyid)};alg={_sf_string(alg)}"
    )


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
    """Sign a request; return the headers to add: Content-Digest, Signature-Input, Signature.

    ``url`` is the absolute target URI exactly as it will be sent; ``created`` is Unix time in
    seconds; ``nonce`` must be unique per key within the server's skew window.
    """
    if not _KEY.fullmatch(label):
        raise ValueError("a signature label is a lowercase structured-field key")
    if isinstance(created, bool) or not isinstance(created, int) or created < 0:
        raise ValueError("created is a non-negative integer (Unix seconds)")
    if not nonce:
        raise ValueError("a nonce is required")
    digest = content_digest(body)
    params = _params_text(DEFAULT_COMPONENTS, created, key.key_id, nonce, "ed25519")
    sig_input = SignatureInput(
        label, DEFAULT_COMPONENTS, created, key.key_id, nonce, "ed25519", None, params
    )
    fields = {k.lower(): v for k, v in headers.items()}
    fields["content-digest"] = digest
    signature = key.sign(signature_base(method, url, fields, sig_input))
    return {
        "Content-Digest": digest,
        "Signature-Input": f"{label}={params}",
        "Signature": f"{label}=:{b64_encode(signature)}:",
    }


# -- verification -----------------------------------------------------------------------------


def _component_names(items: _Bare | _InnerList) -> tuple[str, ...]:
    if not isinstance(items, tuple):
        raise _malformed("signature input is not an inner list of components")
    names: list[str] = []
    for item, params in items:
        if not isinstance(item, str) or isinstance(item, _Token):
            raise _malformed("a covered component is not a string")
        if params:
            raise _malformed(f"component parameters are not supported ({item})")
        if item == "@signature-params":
            raise _malformed("@signature-params cannot be covered")
        if not (_DERIVED_NAME.fullmatch(item) or _FIELD_NAME.fullmatch(item)):
            raise _malformed(f"bad component name {item!r}")
        names.append(item)
    if len(set(names)) != len(names):
        raise _malformed("a component is covered twice")
    return tuple(names)


def _int_param(params: _Params, name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _malformed(f"{name} must be a non-negative integer")
    return value


def _str_param(params: _Params, name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or isinstance(value, _Token):
        raise _malformed(f"{name} must be a string")
    return value


def parse_signature(
    headers: Mapping[str, str], label: str | None = None
) -> tuple[SignatureInput, bytes]:
    """Parse Signature-Input and Signature; return the signature's input and its bytes.

    Without ``label`` the request must carry exactly one signature; with it, other labels are
    ignored. Nothing is verified here: the server uses it to learn ``keyid`` first.
    """
    fields = _fields(headers, ("signature-input", "signature"))
    raw_input = fields.get("signature-input", "").strip(" \t")
    raw_sig = fields.get("signature", "").strip(" \t")
    if not raw_input or not raw_sig:
        raise HttpSignatureError("missing", "no Signature-Input and Signature headers")
    inputs = _parse_field(raw_input)
    sigs = _parse_field(raw_sig)
    if label is None:
        if len(inputs) != 1 or len(sigs) != 1:
            raise _malformed("expected exactly one signature")
        label = next(iter(inputs))
        if label not in sigs:
            raise _malformed("Signature-Input and Signature labels differ")
    elif label not in inputs and label not in sigs:
        raise HttpSignatureError("missing", f"no signature labelled {label}")
    elif label not in inputs or label not in sigs:
        raise _malformed(f"signature {label} is in only one of Signature-Input and Signature")
    member = inputs[label]
    components = _component_names(member.value)
    sig_member = sigs[label]
    if not isinstance(sig_member.value, bytes) or sig_member.params:
        raise _malformed("signature is not a byte sequence")
    params = member.params
    created = _int_param(params, "created")
    expires = _int_param(params, "expires")
    keyid = _str_param(params, "keyid")
    nonce = _str_param(params, "nonce")
    alg = _str_param(params, "alg")
    if created is None:
        raise _malformed("created is required")
    if not keyid:
        raise _malformed("keyid is required")
    if expires is not None and expires < created:
        raise _malformed("expires is before created")
    sig_input = SignatureInput(label, components, created, keyid, nonce, alg, expires, member.raw)
    return sig_input, sig_member.value


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
    label: str | None = None,
) -> SignatureInput:
    """Verify a signed request fully and return its parsed signature input.

    The steps run in this order, each with its own reason: parse (``missing``, ``malformed``);
    ``required`` components covered (``components``); ``alg`` is ed25519 when present
    (``malformed``); ``created`` within ``max_skew`` of ``now`` and ``expires`` not passed
    (``stale``); ``keyid`` names ``key`` and the Ed25519 signature verifies over the signature
    base (``bad_signature``); the body matches Content-Digest (``digest_mismatch``), checked
    whenever the header is present, which it must be when covered.
    """
    sig_input, signature = parse_signature(headers, label)
    missing = [c for c in required if c not in sig_input.components]
    if missing:
        raise HttpSignatureError("components", f"signature does not cover {', '.join(missing)}")
    if sig_input.alg is not None and sig_input.alg != "ed25519":
        raise _malformed(f"alg {sig_input.alg!r} is not ed25519")
    if abs(now - sig_input.created) > max_skew:
        raise HttpSignatureError("stale", "created is outside the allowed clock skew")
    if sig_input.expires is not None and now > sig_input.expires:
        raise HttpSignatureError("stale", "signature has expired")
    if sig_input.keyid != key.key_id:
        raise HttpSignatureError("bad_signature", "keyid does not name the verifying key")
    base = signature_base(method, url, headers, sig_input)
    try:
        key.verify(base, signature)
    except VerificationError as exc:
        raise HttpSignatureError("bad_signature", "signature does not verify") from exc
    digest = _fields(headers, ("content-digest",)).get("content-digest")
    if digest is not None:
        verify_content_digest(digest, body)
    return sig_input
