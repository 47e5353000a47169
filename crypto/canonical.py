"""RFC 8785 (JCS) canonical JSON for everything zonex signs or hashes.

Signed objects carry no floats: integers stay within +/-(2**53 - 1) and every other number
travels as a decimal string. :func:`canonicalize` enforces that before encoding, and
:func:`parse_canonical` accepts only bytes that are already canonical, so a verifier can hash
exactly the bytes it received.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

from crypto.errors import EncodingError

MAX_SAFE_INTEGER = 2**53 - 1


def _check(value: Any, depth: int = 0) -> None:
    if depth > 64:
        raise EncodingError("JSON nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise EncodingError("integer outside +/-(2**53 - 1)")
        return
    if isinstance(value, float):
        raise EncodingError("floats are not allowed in signed objects; use a decimal string")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError("JSON object keys must be strings")
            _check(item, depth + 1)
        return
    raise EncodingError(f"type {type(value).__name__} cannot be canonicalized")


def canonicalize(value: Any) -> bytes:
    """Encode ``value`` as RFC 8785 canonical JSON (UTF-8 bytes)."""
    _check(value)
    fast = _fast_encode(value)
    if fast is not None:
        return fast
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, ValueError, TypeError) as exc:
        raise EncodingError(f"cannot canonicalize: {exc}") from exc


def _no_floats(text: str) -> Any:
    raise EncodingError("floats are not allowed in canonical zonex objects")


def _fast_encode(value: Any) -> bytes | None:
    """The stdlib encoding equals RFC 8785 when every key is ASCII and there are no floats.

    (Both escape only '"', '\\' and C0 controls, with the same short forms and lowercase
    ``\\u00xx``; key order differs only for non-ASCII keys, which fall back to rfc8785.)
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                if not key.isascii():
                    return None
                stack.append(sub)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a "\ud800" escape
        raise EncodingError("JSON string holds a lone surrogate") from exc


def parse_canonical(data: bytes) -> Any:
    """Parse JSON that must already be in canonical form; raise :class:`EncodingError` otherwise.

    Duplicate keys, insignificant whitespace, floats, escaped non-ASCII and unsorted keys are all
    refused, because each would let two byte strings carry the same object.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_float=_no_floats, parse_constant=_no_floats)
    except UnicodeDecodeError as exc:
        raise EncodingError("JSON is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise EncodingError(f"invalid JSON: {exc.msg} at {exc.pos}") from exc
    except RecursionError as exc:
        raise EncodingError("JSON nested too deeply") from exc
    try:
        _check(value)
    except RecursionError as exc:
        raise EncodingError("JSON nested too deeply") from exc
    encoded = _fast_encode(value)
    if encoded is None:
        encoded = canonicalize(value)
    if encoded != data:
        raise EncodingError("JSON is not in RFC 8785 canonical form")
    return value
