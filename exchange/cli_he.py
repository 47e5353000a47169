"""``zonex score`` and ``zonex secure-sum``: homomorphic computations from the key holder's side."""

from __future__ import annotations

from exchange.cli import app  # noqa: F401  (commands register on it)
