"""The witness's decision, pure: every answer of tlog-witness "add-checkpoint" from a stored
state and a request, and the properties that make a witness worth having (it never cosigns
two histories, it never rolls back)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.keys import SigningKey
from crypto.merkle import EMPTY_ROOT
from crypto.note import Checkpoint, NoteSigner, cosign_checkpoint, sign_checkpoint
from exchange.server.witness.decision import Accepted, LogState, Refusal, RefusalKind, decide
from exchange.server.witness.protocol import AddCheckpointRequest
from tests.witness._support import FakeLog

ORIGIN = "city.test/log"
LOG = FakeLog(ORIGIN, SigningKey(b"\x07" * 32)).grow(40)
TRUSTED = [LOG.verifier]


def request(
    log: FakeLog, old: int, size: int, proof: list[bytes] | None = None
) -> AddCheckpointRequest:
    return AddCheckpointRequest(
        old, tuple(log.proof(old, size) if proof is None else proof), log.note(size)
    )


def state(size: int, log: FakeLog = LOG) -> LogState:
    return LogState(size, log.tree.root(size))


def refused(outcome: Accepted | Refusal, kind: RefusalKind) -> Refusal:
    assert isinstance(outcome, Refusal), outcome
    assert outcome.kind is kind, outcome
    return outcome


# -- accepted ------------------------------------------------------------------------------


def test_a_first_checkpoint_from_old_size_zero_is_accepted() -> None:
    outcome = decide(request(LOG, 0, 10), TRUSTED, None)
    assert outcome == Accepted(LOG.checkpoint(10), state(10))


def test_a_consistent_checkpoint_moves_the_state_forward() -> None:
    outcome = decide(request(LOG, 10, 25), TRUSTED, state(10))
    assert isinstance(outcome, Accepted) and outcome.state == state(25)


def test_the_same_checkpoint_again_is_accepted_and_changes_nothing() -> None:
    outcome = decide(request(LOG, 25, 25), TRUSTED, state(25))
    assert isinstance(outcome, Accepted) and outcome.state == state(25)


def test_the_empty_tree_is_accepted() -> None:
    empty = FakeLog(ORIGIN, LOG.key)
    outcome = decide(request(empty, 0, 0), [empty.verifier], None)
    assert isinstance(outcome, Accepted) and outcome.state == LogState(0, EMPTY_ROOT)


def test_signatures_from_unknown_keys_and_cosignatures_are_ignored() -> None:
    stranger = NoteSigner("other.test/w", SigningKey.generate())
    note = cosign_checkpoint(LOG.note(12), stranger, 1_700_000_000)
    note += "— someone.else/key AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
    outcome = decide(AddCheckpointRequest(10, tuple(LOG.proof(10, 12)), note), TRUSTED, state(10))
    assert isinstance(outcome, Accepted)


def test_any_of_several_trusted_keys_may_sign() -> None:
    rotated = FakeLog(ORIGIN, SigningKey.generate(), LOG.tree)
    outcome = decide(request(rotated, 10, 12), [LOG.verifier, rotated.verifier], state(10))
    assert isinstance(outcome, Accepted)


# -- refused, in the spec's order ---------------------------------------------------------------


def test_an_unknown_log_is_404() -> None:
    refused(decide(request(LOG, 0, 5), [], None), RefusalKind.UNKNOWN_LOG)
    assert RefusalKind.UNKNOWN_LOG.status == 404


def test_no_signature_from_a_trusted_key_is_403() -> None:
    impostor = FakeLog(ORIGIN, SigningKey.generate(), LOG.tree)
    outcome = refused(decide(request(impostor, 0, 5), TRUSTED, None), RefusalKind.BAD_SIGNATURE)
    assert outcome.checkpoint is None
    assert RefusalKind.BAD_SIGNATURE.status == 403


def test_a_failing_signature_from_a_trusted_key_is_403_even_beside_a_good_one() -> None:
    note = LOG.note(5)
    line = note.rpartition("\n\n")[2]
    name, encoded = line.rstrip("\n").rsplit(" ", 1)
    # a second line with the trusted key's name and id but another signature
    forged = sign_checkpoint(Checkpoint(ORIGIN, 5, LOG.tree.root(5), ("x",)), LOG.signer)
    other_sig = forged.rstrip("\n").rsplit(" ", 1)[1]
    bad = note + f"{name} {other_sig}\n"
    assert other_sig != encoded
    outcome = decide(AddCheckpointRequest(0, (), bad), TRUSTED, None)
    refused(outcome, RefusalKind.BAD_SIGNATURE)


def test_a_checkpoint_for_another_origin_than_its_keys_is_not_signed_by_them() -> None:
    other = FakeLog("district.test/log", LOG.key, LOG.tree)
    refused(decide(request(other, 0, 5), TRUSTED, None), RefusalKind.BAD_SIGNATURE)


def test_an_old_size_above_the_checkpoint_size_is_400() -> None:
    outcome = decide(request(LOG, 12, 10, proof=[]), TRUSTED, state(12))
    refused(outcome, RefusalKind.BAD_REQUEST)
    assert RefusalKind.BAD_REQUEST.status == 400


def test_a_stale_old_size_is_409_with_the_stored_size() -> None:
    outcome = refused(
        decide(request(LOG, 5, 12), TRUSTED, state(10)), RefusalKind.OLD_SIZE_MISMATCH
    )
    assert outcome.stored_size == 10 and RefusalKind.OLD_SIZE_MISMATCH.status == 409


def test_a_replayed_older_checkpoint_is_409() -> None:
    outcome = refused(decide(request(LOG, 5, 5), TRUSTED, state(10)), RefusalKind.OLD_SIZE_MISMATCH)
    assert outcome.stored_size == 10


def test_an_old_size_for_a_log_never_cosigned_is_409_with_zero() -> None:
    outcome = refused(decide(request(LOG, 5, 12), TRUSTED, None), RefusalKind.OLD_SIZE_MISMATCH)
    assert outcome.stored_size == 0


def test_a_non_empty_tree_of_size_zero_is_422() -> None:
    bogus = sign_checkpoint(Checkpoint(ORIGIN, 0, bytes(32)), LOG.signer)
    outcome = decide(AddCheckpointRequest(0, (), bogus), TRUSTED, None)
    refused(outcome, RefusalKind.INCONSISTENT)
    assert RefusalKind.INCONSISTENT.status == 422


def test_a_proof_from_size_zero_is_422() -> None:
    outcome = decide(request(LOG, 0, 10, proof=[bytes(32)]), TRUSTED, None)
    refused(outcome, RefusalKind.INCONSISTENT)


def test_another_root_at_the_stored_size_is_a_fork_422() -> None:
    fork = LOG.fork(b"fork", 7).grow(10)
    outcome = refused(decide(request(fork, 10, 10), TRUSTED, state(10)), RefusalKind.INCONSISTENT)
    # the log did sign it: the refusal carries it as evidence
    assert outcome.checkpoint == fork.checkpoint(10)


def test_a_forked_larger_checkpoint_is_422() -> None:
    fork = LOG.fork(b"fork", 7).grow(20)
    refused(decide(request(fork, 10, 20), TRUSTED, state(10)), RefusalKind.INCONSISTENT)


def test_a_bad_proof_is_422() -> None:
    proof = LOG.proof(10, 25)
    proof[0] = bytes(32)
    refused(decide(request(LOG, 10, 25, proof=proof), TRUSTED, state(10)), RefusalKind.INCONSISTENT)


@pytest.mark.parametrize("change", ["drop", "extra", "swap"])
def test_a_proof_of_the_wrong_length_or_order_is_422(change: str) -> None:
    proof = LOG.proof(10, 25)
    if change == "drop":
        proof = proof[:-1]
    elif change == "extra":
        proof = [*proof, bytes(32)]
    else:
        proof = proof[::-1]
    refused(decide(request(LOG, 10, 25, proof=proof), TRUSTED, state(10)), RefusalKind.INCONSISTENT)


# -- properties ---------------------------------------------------------------------------------

sizes = st.integers(min_value=0, max_value=40)


@settings(max_examples=200, deadline=None)
@given(sizes, sizes)
def test_consistent_checkpoints_are_accepted_for_any_sizes(old: int, new: int) -> None:
    old, new = min(old, new), max(old, new)
    stored = None if old == 0 else state(old)
    outcome = decide(request(LOG, old, new), TRUSTED, stored)
    assert isinstance(outcome, Accepted) and outcome.state == state(new)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_flipped_proof_bit_is_refused(data: st.DataObject) -> None:
    old = data.draw(st.integers(1, 39), label="old")
    new = data.draw(st.integers(old + 1, 40), label="new")
    proof = LOG.proof(old, new)
    index = data.draw(st.integers(0, len(proof) - 1), label="hash")
    bit = data.draw(st.integers(0, 255), label="bit")
    flipped = bytearray(proof[index])
    flipped[bit // 8] ^= 1 << (bit % 8)
    proof[index] = bytes(flipped)
    outcome = decide(request(LOG, old, new, proof=proof), TRUSTED, state(old))
    refused(outcome, RefusalKind.INCONSISTENT)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(0, 39))
def test_the_state_never_goes_back_and_never_forks(
    stored_size: int, old: int, new: int, common: int
) -> None:
    """Whatever a log with the trusted key submits (honest or forked, any sizes), an accepted
    checkpoint is at least the stored size and extends the stored tree."""
    fork = LOG.fork(b"other", min(common, 40)).grow(40)
    for log in (LOG, fork):
        if old > new:
            continue
        outcome = decide(
            request(log, old, new), TRUSTED, state(stored_size) if stored_size else None
        )
        if isinstance(outcome, Accepted):
            assert outcome.state.size >= stored_size
            assert old == stored_size
            # the accepted tree agrees with the stored one on every leaf the stored one had
            assert log.tree.root(stored_size) == LOG.tree.root(stored_size)
