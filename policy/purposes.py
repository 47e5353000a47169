"""The exchange's purpose vocabulary: a hierarchy of named purposes of use.

Every access request names one purpose and every grant is bound to one. A grant for a parent
purpose covers requests for any purpose below it (``financial-services`` covers
``credit-assessment``), never the reverse. The default vocabulary ships as package data
(``purposes.json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from policy.errors import UnknownPurposeError, VocabularyError

__all__ = ["Purpose", "PurposeVocabulary"]

PURPOSE_RE = re.compile(r"[a-z][a-z0-9-]{1,62}")
_DOCUMENT_TYPE = "zonex.purposes"


@dataclass(frozen=True)
class Purpose:
    """One entry of the vocabulary. ``parent`` is ``None`` for a top-level purpose."""

    name: str
    title: str
    title_zh: str = ""
    parent: str | None = None


class PurposeVocabulary:
    """An immutable purpose hierarchy. Unknown names raise :class:`UnknownPurposeError`."""

    def __init__(self, purposes: Iterable[Purpose]) -> None:
        by_name: dict[str, Purpose] = {}
        for p in purposes:
            if not PURPOSE_RE.fullmatch(p.name):
                raise VocabularyError(
                    f"purpose name {p.name!r}: use 2-63 of a-z, 0-9 and '-', starting with a letter"
                )
            if p.name in by_name:
                raise VocabularyError(f"purpose {p.name!r} is listed twice")
            by_name[p.name] = p
        for p in by_name.values():
            if p.parent is not None and p.parent not in by_name:
                raise VocabularyError(f"purpose {p.name!r} has unknown parent {p.parent!r}")
        within: dict[str, frozenset[str]] = {}
        for name in by_name:
            chain = [name]
            parent = by_name[name].parent
            while parent is not None:
                if parent in chain:
                    raise VocabularyError(f"purpose {name!r} is part of a cycle")
                chain.append(parent)
                parent = by_name[parent].parent
            within[name] = frozenset(chain)
        self._by_name = by_name
        # name -> the name itself and all its ancestors: the grants that cover it
        self._covered_by = within

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> PurposeVocabulary:
        """Build a vocabulary from its JSON document (the format of ``purposes.json``)."""
        if document.get("type") != _DOCUMENT_TYPE or document.get("version") != 1:
            raise VocabularyError(f"not a {_DOCUMENT_TYPE} version 1 document")
        found: list[Purpose] = []

        def walk(nodes: object, parent: str | None) -> None:
            if not isinstance(nodes, list):
                raise VocabularyError("'purposes' and 'children' must be lists")
            for node in nodes:
                if not isinstance(node, dict) or not isinstance(node.get("name"), str):
                    raise VocabularyError("each purpose is an object with a string 'name'")
                unknown = set(node) - {"name", "title", "title_zh", "children"}
                if unknown:
                    raise VocabularyError(
                        f"purpose {node['name']!r}: unknown keys {sorted(unknown)}"
                    )
                found.append(
                    Purpose(
                        name=node["name"],
                        title=str(node.get("title", node["name"])),
                        title_zh=str(node.get("title_zh", "")),
                        parent=parent,
                    )
                )
                walk(node.get("children", []), node["name"])

        walk(document.get("purposes"), None)
        return cls(found)

    @classmethod
    def load_default(cls) -> PurposeVocabulary:
        """The vocabulary shipped with zonex (loaded once, then shared: it is immutable)."""
        return _default_vocabulary()

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Purpose]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Purpose:
        """The purpose called ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownPurposeError(
                f"unknown purpose {name!r}; the vocabulary has: {', '.join(self._by_name)}"
            ) from None

    def check(self, name: str) -> str:
        """Return ``name`` if it is in the vocabulary, else raise :class:`UnknownPurposeError`."""
        return self.get(name).name

    def ancestors(self, name: str) -> tuple[str, ...]:
        """The purposes above ``name``, nearest first."""
        out: list[str] = []
        parent = self.get(name).parent
        while parent is not None:
            out.append(parent)
            parent = self._by_name[parent].parent
        return tuple(out)

    def children(self, name: str) -> tuple[str, ...]:
        """The purposes directly below ``name``."""
        self.get(name)
        return tuple(p.name for p in self._by_name.values() if p.parent == name)

    def is_within(self, requested: str, granted: str) -> bool:
        """Whether a grant for ``granted`` covers a request for ``requested``: the same purpose or
        one below it. Both must be in the vocabulary."""
        covering = self.covering(requested)
        self.get(granted)
        return granted in covering

    def covering(self, requested: str) -> frozenset[str]:
        """Every purpose whose grant covers a request for ``requested`` (itself and ancestors)."""
        self.get(requested)
        return self._covered_by[requested]


@cache
def _default_vocabulary() -> PurposeVocabulary:
    text = resources.files("policy").joinpath("purposes.json").read_text("utf-8")
    return PurposeVocabulary.from_document(json.loads(text))
