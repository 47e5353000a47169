from __future__ import annotations

import pytest

from policy import PurposeVocabulary, UnknownPurposeError
from policy.errors import VocabularyError
from policy.purposes import Purpose


@pytest.fixture
def vocab() -> PurposeVocabulary:
    return PurposeVocabulary.load_default()


def test_default_vocabulary(vocab: PurposeVocabulary) -> None:
    assert 12 <= len(vocab) <= 20
    roots = {p.name for p in vocab if p.parent is None}
    assert roots == {"financial-services", "public-administration", "social-services", "research"}
    assert set(vocab.children("financial-services")) >= {"credit-assessment", "anti-fraud"}
    assert set(vocab.children("public-administration")) >= {
        "statistics",
        "policy-evaluation",
        "tax-administration",
    }
    assert vocab.ancestors("credit-assessment") == ("financial-services",)
    assert all(p.title and p.title_zh for p in vocab)
    assert PurposeVocabulary.load_default() is vocab  # loaded once


def test_parent_covers_child_never_the_reverse(vocab: PurposeVocabulary) -> None:
    assert vocab.is_within("credit-assessment", "financial-services")
    assert vocab.is_within("credit-assessment", "credit-assessment")
    assert not vocab.is_within("financial-services", "credit-assessment")
    assert not vocab.is_within("anti-fraud", "credit-assessment")  # siblings
    assert not vocab.is_within("statistics", "financial-services")  # other branch
    assert vocab.covering("statistics") == {"statistics", "public-administration"}


@pytest.mark.parametrize(("requested", "granted"), [("marketing", "research"), ("research", "x")])
def test_unknown_purpose_is_a_clear_error(
    vocab: PurposeVocabulary, requested: str, granted: str
) -> None:
    with pytest.raises(UnknownPurposeError, match="unknown purpose") as info:
        vocab.is_within(requested, granted)
    assert "credit-assessment" in str(info.value)  # names what is available
    assert isinstance(info.value, LookupError)


def test_deeper_hierarchies() -> None:
    vocab = PurposeVocabulary(
        [
            Purpose("health", "Health"),
            Purpose("epidemiology", "Epidemiology", parent="health"),
            Purpose("outbreaks", "Outbreaks", parent="epidemiology"),
        ]
    )
    assert vocab.is_within("outbreaks", "health")
    assert vocab.ancestors("outbreaks") == ("epidemiology", "health")
    assert not vocab.is_within("health", "outbreaks")


@pytest.mark.parametrize(
    "purposes",
    [
        [Purpose("a-1", "A"), Purpose("a-1", "again")],
        [Purpose("Bad_Name", "B")],
        [Purpose("*", "wildcard")],
        [Purpose("child", "C", parent="nobody")],
        [Purpose("aa", "A", parent="bb"), Purpose("bb", "B", parent="aa")],
    ],
    ids=["duplicate", "bad-name", "wildcard", "unknown-parent", "cycle"],
)
def test_malformed_vocabularies_are_refused(purposes: list[Purpose]) -> None:
    with pytest.raises(VocabularyError):
        PurposeVocabulary(purposes)


def test_document_format_is_checked() -> None:
    with pytest.raises(VocabularyError):
        PurposeVocabulary.from_document({"type": "other", "version": 1, "purposes": []})
    with pytest.raises(VocabularyError):
        PurposeVocabulary.from_document(
            {"type": "zonex.purposes", "version": 1, "purposes": [{"name": "ab", "extra": 1}]}
        )
