"""The console's guards against other web pages and other hosts.

The console signs with the operator's key on the operator's behalf, so a page on another site
that makes the browser post a form to it must get nothing done (CSRF), and a name that resolves
to the loopback address (DNS rebinding) must not reach it:

- every request's ``Host`` must be one of the console's own names (:func:`allowed_hosts`);
- every POST must come from the console's own origin (``Origin``, or ``Referer`` when a browser
  sends no ``Origin``) and carry the per-process random token the console put in its forms.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

#: the names under which a console bound to a loopback address is reached
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


class CsrfError(Exception):
    """A state-changing request that did not come from the console's own pages."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str) -> frozenset[str]:
    """The host names a request may name: the loopback names for a loopback bind, else the
    bind address itself (a wildcard bind names no host: give ``--host`` the machine's name)."""
    if is_loopback(bind):
        return LOOPBACK_NAMES | {bind.strip("[]")}
    return frozenset({bind.strip("[]")})


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else ""
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def new_token() -> str:
    """The per-process token put in every form (256 random bits)."""
    return secrets.token_urlsafe(32)


def check_post(headers: Mapping[str, str], scheme: str, token: str, given: str | None) -> None:
    """Raise :class:`CsrfError` unless a POST comes from the console's own origin and carries
    its token. ``headers`` are the request's (the ``Host`` already checked)."""
    own = f"{scheme}://{headers.get('host', '')}"
    origin = headers.get("origin")
    if origin is not None:
        if origin != own:
            raise CsrfError(f"a form posted from another origin ({origin})")
    else:
        referer = headers.get("referer")
        if referer is None:
            raise CsrfError("a form posted without Origin or Referer")
        parts = urlsplit(referer)
        if f"{parts.scheme}://{parts.netloc}" != own:
            raise CsrfError("a form posted from another origin")
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise CsrfError("the form's token is missing or wrong: reload the console's page")
