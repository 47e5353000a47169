"""Errors raised by :mod:`crypto`. The exchange maps them onto its own error tree."""

from __future__ import annotations


class CryptoError(Exception):
    """Base class for every error raised by :mod:`crypto`."""


class EncodingError(CryptoError, ValueError):
    """Input bytes or text are not in the expected encoding (base64url, PEM, canonical JSON...)."""


class VerificationError(CryptoError):
    """A signature, digest or proof did not verify. The message says why (for logs and auditors)."""
