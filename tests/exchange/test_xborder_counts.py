"""Counting subjects sent abroad (exchange.server.xborder.count_subjects) on a real SQLite
database: a subject is never counted twice, and each count is the size of the union of the
subjects released so far in its class, whatever the order, repeats and overlaps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from exchange.server.db import Base
from exchange.server.models import XborderSubjectRow
from exchange.server.xborder import SubjectKey, count_subjects
from policy.xborder import PiClass

KEY = SubjectKey(bytes(range(32)))
PROVIDER = "a" * 64

releases = st.lists(
    st.tuples(
        st.lists(st.integers(0, 40), max_size=12),
        st.sampled_from(
            [
                (PiClass.PERSONAL,),
                (PiClass.SENSITIVE,),
                (PiClass.PERSONAL, PiClass.SENSITIVE),
                (PiClass.NONE,),
            ]
        ),
    ),
    max_size=12,
)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@settings(max_examples=60, deadline=None)
@given(releases=releases, year=st.integers(2020, 2030))
def test_counts_are_the_size_of_the_union(
    engine: Engine, releases: list[tuple[list[int], tuple[PiClass, ...]]], year: int
) -> None:
    provider = f"{year:064d}"  # a fresh provider per example: examples share the database
    with Session(engine) as session, session.begin():
        seen: dict[PiClass, set[int]] = {PiClass.PERSONAL: set(), PiClass.SENSITIVE: set()}
        for ids, classes in releases:
            got = count_subjects(session, provider, year, KEY.digests(ids), classes)
            for cls, members in seen.items():
                if cls not in classes:
                    assert cls not in got
                    continue
                before = len(members)
                members.update(ids)
                assert got[cls] == (before, len(members))
            session.flush()
        rows = session.scalar(select(func.count()).where(XborderSubjectRow.provider == provider))
        # one row per distinct subject ever counted, whatever its classes
        counted = seen[PiClass.PERSONAL] | seen[PiClass.SENSITIVE]
        assert rows == len(counted)
        session.rollback()


def test_digests_are_keyed_and_distinct() -> None:
    other = SubjectKey(bytes(range(1, 33)))
    assert KEY.digests(["x"]) != other.digests(["x"])
    assert len(KEY.digests(["x", "x", "y", None])) == 2
    assert all(len(d) == 32 for d in KEY.digests(["x"]))
    assert repr(KEY) == "SubjectKey(...)"
