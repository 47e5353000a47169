"""The operator's desk over the live exchange: what the console's operator pages read and do.

Every call goes through the SDK's :class:`~exchange.client.sdk.Client`, signed with the
operator's key, which stays in the console's process. An approval is the SDK's
:meth:`~exchange.client.sdk.Client.approve`, the call ``zonex approve`` makes: for a request
awaiting the operator it signs the provider's pending terms exactly.
"""

from __future__ import annotations

import threading
from typing import Any

from exchange.client.sdk import AccessRequest, Client, Principal, Zone

#: what the operator's forms may set a principal's or a zone's status to
STATUSES = ("active", "suspended")


class OperatorDesk:
    """The operator's calls, one at a time (the SDK's HTTP client is shared)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()

    @property
    def key_id(self) -> str:
        return self.client.key.key_id

    def pending_approvals(self) -> list[AccessRequest]:
        """Requests for important data their provider approved, awaiting the operator."""
        with self._lock:
            return self.client.requests(status="awaiting_operator")

    def approve(self, request_id: str) -> AccessRequest:
        with self._lock:
            return self.client.approve(request_id)

    def reject(self, request_id: str, reason: str) -> AccessRequest:
        with self._lock:
            return self.client.reject(request_id, reason)

    def principals(self) -> list[Principal]:
        with self._lock:
            return self.client.list_principals()

    def set_principal_status(self, key_id: str, status: str) -> dict[str, Any]:
        _check_status(status)
        with self._lock:
            return self.client.set_principal_status(key_id, status)

    def zones(self) -> list[Zone]:
        with self._lock:
            return list(self.client.catalog().zones)

    def set_zone_status(self, zone: str, status: str) -> None:
        _check_status(status)
        with self._lock:
            self.client.set_zone_status(zone, status)

    def incidents(self) -> list[dict[str, Any]]:
        """The monitor's incidents, open ones first, newest first."""
        with self._lock:
            found = self.client.incidents()
        return sorted(found, key=lambda i: (i.get("status") != "open", -(i.get("first_seq") or 0)))

    def label_incident(self, incident_id: str, label: bool) -> dict[str, Any]:
        with self._lock:
            return self.client.label_incident(incident_id, label)

    def close(self) -> None:
        self.client.close()


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
