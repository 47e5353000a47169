"""Errors raised by :mod:`policy`. The exchange maps them onto its own error tree."""

from __future__ import annotations


class PolicyError(Exception):
    """Base class for every error raised by :mod:`policy`."""


class CeilingError(PolicyError, ValueError):
    """A ceiling table tried to loosen the defaults, or an operation is above its ceiling."""


class UnknownPurposeError(PolicyError, LookupError):
    """A purpose is not in the exchange's purpose vocabulary."""


class VocabularyError(PolicyError, ValueError):
    """A purpose vocabulary document is malformed (duplicate names, bad names, cycles)."""


class InvalidRuleError(PolicyError, ValueError):
    """A policy row is malformed or not allowed (for example a wildcard in an allow row)."""


class UnknownRuleError(PolicyError, LookupError):
    """No policy row carries the given rule id."""
