from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy import (
    DEFAULT_CEILINGS,
    CeilingError,
    Level,
    Obligation,
    Operation,
    allowed,
    max_level,
    obligations,
    tighten,
)

Op = Operation

# DESIGN, "Classification", typed independently of policy/levels.py
DESIGN = {
    "L1": set(Op),
    "L2": set(Op),
    "L3": {
        Op.AGGREGATE,
        Op.PSI_CARDINALITY,
        Op.PSI_MEMBERS,
        Op.PSI_AGGREGATE,
        Op.HE_SCORE,
        Op.SECURE_SUM,
    },
    "L4": {Op.AGGREGATE, Op.PSI_AGGREGATE, Op.HE_SCORE, Op.SECURE_SUM},
    "IMPORTANT": {Op.AGGREGATE, Op.SECURE_SUM},
    "CORE": set(),
}


def test_levels_are_ordered_by_severity_not_spelling() -> None:
    assert sorted(Level) == [Level.L1, Level.L2, Level.L3, Level.L4, Level.IMPORTANT, Level.CORE]
    assert Level.L4 < Level.IMPORTANT < Level.CORE
    assert Level.CORE > Level.L1 and Level.L1 <= Level.L1 and Level.L2 >= Level.L1
    assert Level.L4 < "IMPORTANT"  # a plain string is read as a level
    with pytest.raises(ValueError):
        _ = Level.L1 < "banana"


@given(st.lists(st.sampled_from(list(Level)), min_size=1))
def test_max_level_is_the_most_severe(levels: list[Level]) -> None:
    top = max_level(levels)
    assert top in levels
    assert all(level <= top for level in levels)
    assert max_level([lv.value for lv in levels]) == top


def test_max_level_rejects_nothing_and_unknowns() -> None:
    with pytest.raises(ValueError):
        max_level([])
    with pytest.raises(ValueError):
        max_level(["L1", "SECRET"])


def test_default_ceilings_are_the_design_table() -> None:
    assert {lv.value: set(ops) for lv, ops in DEFAULT_CEILINGS.items()} == DESIGN
    assert DEFAULT_CEILINGS[Level.CORE] == frozenset()
    with pytest.raises(TypeError):
        DEFAULT_CEILINGS[Level.CORE] = frozenset(Op)  # type: ignore[index]


@pytest.mark.parametrize("level", list(Level))
@pytest.mark.parametrize("op", list(Operation))
def test_allowed_follows_the_table(level: Level, op: Operation) -> None:
    assert allowed(level, op) is (op in DESIGN[level.value])
    assert allowed(level.value, op.value) is (op in DESIGN[level.value])


def test_allowed_cannot_be_loosened_by_a_table() -> None:
    loose = {Level.CORE: frozenset(Op), Level.L3: frozenset(Op)}
    assert not allowed(Level.CORE, Op.AGGREGATE, loose)
    assert not allowed(Level.L3, Op.EXPORT, loose)
    assert not allowed(Level.L3, Op.AGGREGATE, {})  # a level missing from the table: nothing


def test_tighten_removes_operations() -> None:
    zone = {Level.L3: [Op.AGGREGATE, Op.PSI_AGGREGATE, Op.SECURE_SUM]}
    dataset = {Level.L3: [Op.AGGREGATE, Op.PSI_AGGREGATE], Level.L1: [Op.AGGREGATE]}
    result = tighten(DEFAULT_CEILINGS, zone, dataset)
    assert result[Level.L3] == {Op.AGGREGATE, Op.PSI_AGGREGATE}
    assert result[Level.L1] == {Op.AGGREGATE}
    assert result[Level.L2] == DEFAULT_CEILINGS[Level.L2]
    assert tighten() == DEFAULT_CEILINGS


def test_dataset_cannot_undo_a_zone_tightening() -> None:
    zone = {Level.L3: [Op.AGGREGATE]}
    dataset = {Level.L3: [Op.AGGREGATE, Op.HE_SCORE]}
    assert tighten(DEFAULT_CEILINGS, zone, dataset)[Level.L3] == {Op.AGGREGATE}


@pytest.mark.parametrize(
    ("zone", "dataset"),
    [
        ({Level.L3: [Op.EXPORT]}, None),
        (None, {Level.CORE: [Op.AGGREGATE]}),
        ({Level.IMPORTANT: [Op.AGGREGATE, Op.HE_SCORE]}, None),
    ],
)
def test_tighten_refuses_to_loosen(
    zone: dict[Level, list[Operation]] | None, dataset: dict[Level, list[Operation]] | None
) -> None:
    with pytest.raises(CeilingError, match="never loosened"):
        tighten(DEFAULT_CEILINGS, zone, dataset)


def test_tighten_never_exceeds_the_defaults_even_from_a_loose_base() -> None:
    loose_base = {level: frozenset(Op) for level in Level}
    assert tighten(loose_base) == DEFAULT_CEILINGS


@given(
    st.dictionaries(st.sampled_from(list(Level)), st.frozensets(st.sampled_from(list(Op)))),
)
def test_tighten_is_a_subset_or_an_error(table: dict[Level, frozenset[Operation]]) -> None:
    try:
        result = tighten(DEFAULT_CEILINGS, table)
    except CeilingError:
        assert any(not ops <= DEFAULT_CEILINGS[lv] for lv, ops in table.items())
        return
    for level in Level:
        assert result[level] <= DEFAULT_CEILINGS[level]
        if level in table:
            assert result[level] == table[level]


def test_obligations() -> None:
    assert obligations(Level.L1, Op.EXPORT) == frozenset()
    assert obligations(Level.L2, Op.EXPORT) == {Obligation.MASK_COLUMNS}
    assert obligations(Level.L4, Op.AGGREGATE) == {
        Obligation.K_ANONYMITY,
        Obligation.DIFFERENTIAL_PRIVACY,
    }
    assert obligations("L4", "he_score") == {Obligation.CONSENT}
    assert Obligation.CONSENT in obligations(Level.L3, Op.HE_SCORE)
    for op in (Op.AGGREGATE, Op.SECURE_SUM):
        assert obligations(Level.IMPORTANT, op) == {
            Obligation.DIFFERENTIAL_PRIVACY,
            Obligation.OPERATOR_APPROVAL,
            Obligation.ZONE_APPROVAL,
        }


@pytest.mark.parametrize(("level", "op"), [(Level.CORE, Op.AGGREGATE), (Level.L3, Op.EXPORT)])
def test_no_obligations_above_the_ceiling(level: Level, op: Operation) -> None:
    with pytest.raises(CeilingError):
        obligations(level, op)
