"""C2SP tlog-policy files: the spec's examples, every rejection, quorum evaluation over
cosignatures that verify (and forged ones that must not count), and a property test against a
plain recursive evaluation.

Spec text quoted below is from C2SP/C2SP ``tlog-policy.md`` at commit 5ba5ee8 (the spec was
added in 1896a5a, "tlog-policy: new spec (#233)").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import VerificationError
from crypto.keys import SigningKey
from crypto.note import (
    ALG_COSIGNATURE_V1,
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    cosign_checkpoint,
    sign_checkpoint,
)
from crypto.tlogpolicy import (
    MAX_POLICY_BYTES,
    NONE,
    Policy,
    PolicyError,
    PolicyGroup,
    PolicyLog,
    PolicyWitness,
    check_quorum,
    parse_policy,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "ledger" / "signed-notes.json").read_text(
        "utf-8"
    )
)

ORIGIN = "example.zonex/log"
LOG = NoteSigner(ORIGIN, SigningKey(b"\x01" * 32))
OTHER_LOG = NoteSigner("other.zonex/log", SigningKey(b"\x02" * 32))
#: a pool of witnesses with fixed keys (Ed25519 signing is deterministic)
POOL = [NoteSigner(f"witness.example/w{i}", SigningKey(bytes([0x40 + i]) * 32)) for i in range(8)]
STRANGER = NoteSigner("witness.example/stranger", SigningKey(b"\x7f" * 32))
TIME = 1_700_000_000


def cosigner(signer: NoteSigner) -> NoteVerifier:
    """The witness's cosignature/v1 verifier (type 0x04), as it publishes its vkey."""
    return NoteVerifier(signer.name, signer.key.public_key, signature_type=ALG_COSIGNATURE_V1)


def vkey(signer: NoteSigner) -> str:
    return cosigner(signer).to_verifier_key()


def note(size: int = 42, log: NoteSigner = LOG) -> str:
    return sign_checkpoint(Checkpoint(log.name, size, bytes(range(32))), log)


def cosign(text: str, *witnesses: NoteSigner) -> str:
    for witness in witnesses:
        text = cosign_checkpoint(text, witness, TIME)
    return text


def forged_line(text: str, claimed: NoteSigner, key: SigningKey, timestamp: int = TIME) -> str:
    """A cosignature line in ``claimed``'s name and key ID, signed by another ``key``."""
    body = text[: text.rfind("\n\n") + 1].encode("utf-8")
    signature = key.sign(b"cosignature/v1\ntime %d\n" % timestamp + body)
    blob = claimed.cosignature_key_hash + timestamp.to_bytes(8, "big") + signature
    return f"\u2014 {claimed.name} {b64_encode(blob)}\n"


def rejected(text: str | bytes) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return caught.value


# -- the spec's examples -------------------------------------------------------------------

#: tlog-policy.md, "Example policy", verbatim: "Actual keys are elided, for brevity, and the
#: optional URLs are omitted"; each ``<vkey>`` is filled in below, in order.
SPEC_EXAMPLE = """\
log <vkey>

witness X1 <vkey>
witness X2 <vkey>
witness X3 <vkey>
group X-witnesses 2 X1 X2 X3

witness Y1 <vkey>
witness Y2 <vkey>
witness Y3 <vkey>
group Y-witnesses any Y1 Y2 Y3

group X-and-Y all X-witnesses Y-witnesses
quorum X-and-Y
"""
X = dict(zip(("X1", "X2", "X3"), POOL[0:3], strict=True))
Y = dict(zip(("Y1", "Y2", "Y3"), POOL[3:6], strict=True))
BY_NAME = {**X, **Y}


def spec_example() -> str:
    keys = iter([LOG.verifier_key(), *(vkey(w) for w in BY_NAME.values())])
    return re.sub("<vkey>", lambda _: next(keys), SPEC_EXAMPLE)


def test_spec_example_parses() -> None:
    policy = parse_policy(spec_example())
    assert [log.verifier for log in policy.logs] == [LOG.verifier()]
    assert policy.witness_names == ("X1", "X2", "X3", "Y1", "Y2", "Y3")
    assert [w.verifier for w in policy.witnesses] == [cosigner(w) for w in BY_NAME.values()]
    assert [w.line for w in policy.witnesses] == [3, 4, 5, 8, 9, 10]
    assert policy.groups == (
        PolicyGroup("X-witnesses", 2, ("X1", "X2", "X3"), 6),
        PolicyGroup("Y-witnesses", 1, ("Y1", "Y2", "Y3"), 11),
        PolicyGroup("X-and-Y", 2, ("X-witnesses", "Y-witnesses"), 13),
    )
    assert (policy.quorum, policy.quorum_line) == ("X-and-Y", 14)
    assert policy.lists_log(LOG.verifier())
    assert not policy.lists_log(OTHER_LOG.verifier())


@pytest.mark.parametrize(
    ("cosigners", "ok"),
    [
        # "valid cosignatures from at least two of the X-witnesses, and from at least one of
        # the Y-witnesses"
        ((), False),
        (("X1", "X2"), False),
        (("Y1", "Y2", "Y3"), False),
        (("X1", "Y1"), False),
        (("X1", "X2", "X3"), False),
        (("X1", "X2", "Y3"), True),
        (("X2", "X3", "Y1"), True),
        (("X1", "X3", "Y1", "Y2"), True),
        (("X1", "X2", "X3", "Y1", "Y2", "Y3"), True),
    ],
)
def test_spec_example_quorum(cosigners: tuple[str, ...], ok: bool) -> None:
    policy = parse_policy(spec_example())
    assert policy.evaluate(cosigners).ok is ok
    report = check_quorum(cosign(note(), *(BY_NAME[n] for n in cosigners)), policy)
    assert report.ok is ok
    assert [c.name for c in report.cosigned] == sorted(cosigners)
    assert all(c.timestamp == TIME for c in report.cosigned)
    assert not report.invalid


def test_spec_example_names_the_short_group() -> None:
    policy = parse_policy(spec_example())
    report = check_quorum(cosign(note(), X["X1"], Y["Y2"]), policy)
    assert not report.ok
    assert [s.group for s in report.result.short] == ["X-and-Y", "X-witnesses"]
    assert report.explain() == (
        "quorum X-and-Y not met: group X-and-Y: 1 of 2 witnessed, 2 needed (missing "
        "X-witnesses); group X-witnesses: 1 of 3 witnessed, 2 needed (missing X2, X3)"
    )
    both_short = policy.evaluate([])
    assert [s.group for s in both_short.short] == ["X-and-Y", "X-witnesses", "Y-witnesses"]
    met = check_quorum(cosign(note(), X["X1"], X["X3"], Y["Y2"]), policy)
    assert met.explain() == "quorum X-and-Y met, cosigned by X1, X3, Y2"


def test_spec_syntax_examples() -> None:
    """tlog-policy.md: ``quorum none`` ("To not require any cosignatures at all"), the three
    group forms ``group <name> all|any|<k> <name>...``, and optional URLs."""
    w = [vkey(s) for s in POOL[:3]]
    only_none = parse_policy("quorum none\n")
    assert (only_none.logs, only_none.witnesses, only_none.quorum) == ((), (), NONE)
    assert only_none.evaluate([]).ok
    assert only_none.evaluate([]).explain() == "quorum none: no cosignature required"
    forms = parse_policy(
        f"log {LOG.verifier_key()} https://log.example/\n"
        f"witness A {w[0]} https://a.example/\n"
        f"witness B {w[1]}\n"
        f"witness C {w[2]}\n"
        "group all-of all A B\n"
        "group any-of any C\n"
        "group k-of 1 all-of any-of\n"
        "quorum k-of\n"
    )
    assert forms.logs[0].url == "https://log.example/"
    assert [x.url for x in forms.witnesses] == ["https://a.example/", None, None]
    assert [(g.name, g.threshold) for g in forms.groups] == [
        ("all-of", 2),
        ("any-of", 1),
        ("k-of", 1),
    ]
    assert forms.evaluate(["C"]).ok
    assert forms.evaluate(["A", "B"]).ok
    assert not forms.evaluate(["A"]).ok


def test_published_keys() -> None:
    """A log and a witness key from published vectors: sum.golang.org's note key (0x01) and
    the remora.n621.de cosignature key (0x04) from transparency-dev/formats."""
    log_key = VECTORS["sum_golang_org_checkpoints"]["verifier_key"]
    witness_key = next(
        v["key"] for v in VECTORS["verifier_keys"]["valid"] if v["signature_type"] == 4
    )
    policy = parse_policy(f"log {log_key}\nwitness remora {witness_key}\nquorum remora\n")
    assert policy.logs[0].verifier.name == "sum.golang.org"
    assert policy.witnesses[0].verifier.to_verifier_key() == witness_key
    # the key types are not interchangeable
    assert "signature type 0x04" in str(rejected(f"log {witness_key}\nquorum none\n"))
    assert "signature type 0x01" in str(rejected(f"witness w {log_key}\nquorum w\n"))


def test_the_documented_example() -> None:
    """docs/wire-formats-ledger.md, "Witness policies": the example policy parses, and its
    shortfall message is what the page shows."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "wire-formats-ledger.md").read_text(
        "utf-8"
    )
    section = doc.split("## Witness policies", 1)[1]
    policy = parse_policy(section.split("```\n", 2)[1])
    assert policy.witness_names == ("d1", "d2", "d3", "s1")
    assert policy.logs[0].verifier.name == "city.zonex/log"
    shown = re.search(r"`(quorum chain not met: [^`]*)`", section)
    assert shown is not None
    assert policy.evaluate(["d1", "s1"]).explain() == " ".join(shown.group(1).split())
    assert policy.evaluate(["d1", "d3", "s1"]).ok


# -- lines, white space, comments, octets ----------------------------------------------------


def test_whitespace_and_comments() -> None:
    text = (
        "# a comment\n"
        "   # an indented comment\n"
        "\t\n"
        "   \n"
        f"\t log \t{LOG.verifier_key()}  \t \n"
        f"witness\tA\t{vkey(POOL[0])}\t\n"
        "\n"
        "  quorum   A  "  # no newline at the end of the last line
    )
    policy = parse_policy(text)
    assert policy.witness_names == ("A",)
    assert (policy.witnesses[0].line, policy.quorum_line) == (6, 8)


def test_a_comment_is_a_line_of_its_own() -> None:
    err = rejected(f"log {LOG.verifier_key()} # the city's log\nquorum none\n")
    assert err.line == 1 and "log <vkey> [<url>]" in err.reason
    err = rejected(f"witness A {vkey(POOL[0])} #district\nquorum A\n")
    assert err.line == 1 and "comment" in err.reason
    err = rejected(f"witness A {vkey(POOL[0])}\nquorum A # the district\n")
    assert err.line == 2 and "quorum <name>|none" in err.reason


def test_names_are_opaque_octets() -> None:
    """ "the name 0x4B (ASCII "K") is different from the name 0xE2 0x84 0xAA (a Kelvin sign
    encoded using UTF-8)"; octets with the high bit set are opaque, valid UTF-8 or not."""
    text = (
        f"witness K {vkey(POOL[0])}\n".encode()
        + f"witness \u212a {vkey(POOL[1])}\n".encode()
        + b"witness \xff\xfe " + vkey(POOL[2]).encode() + b"\n"
        + "witness a\u00a0b ".encode() + vkey(POOL[3]).encode() + b"\n"  # NBSP is no separator
        + b"# comment \xc3\x28 not UTF-8\n"
        + "group \u5e02 all K \u212a".encode() + b" \xff\xfe a\xc2\xa0b\n"
        + "quorum \u5e02\n".encode()
    )  # fmt: skip
    policy = parse_policy(text)
    names = policy.witness_names
    assert len(names) == len(set(names)) == 4
    assert names[0] == "K" and names[1] == "\u212a" and names[3] == "a\u00a0b"
    assert names[2].encode("utf-8", "surrogateescape") == b"\xff\xfe"
    assert not policy.evaluate(names[:3]).ok
    assert policy.evaluate(names).ok
    err = rejected(b"group \xff any \xff\nquorum none\n")
    assert err.line == 1 and "\\xff is not defined above" in err.reason


@pytest.mark.parametrize(
    ("octet", "code"), [(b"\f", "0x0c"), (b"\x7f", "0x7f"), (b"\r", "0x0d"), (b"\x00", "0x00")]
)
def test_control_characters_are_refused(octet: bytes, code: str) -> None:
    err = rejected(b"quorum none\n# bad " + octet + b" comment\n")
    assert err.line == 2 and f"control character {code}" in err.reason


def test_crlf_line_ends_are_refused() -> None:
    err = rejected(b"# made on another system\r\nquorum none\r\n")
    assert (err.line, "control character 0x0d" in err.reason) == (1, True)


def test_size_limit() -> None:
    err = rejected(b"quorum none\n" + b"#" * MAX_POLICY_BYTES)
    assert err.line is None and "larger than" in err.reason


# -- every rejection -----------------------------------------------------------------------

W = [vkey(s) for s in POOL]
L = LOG.verifier_key()
SAME_KEY_OTHER_NAME = NoteVerifier(
    "another.name/w0", POOL[0].key.public_key, signature_type=ALG_COSIGNATURE_V1
).to_verifier_key()
SAME_LOG_KEY_OTHER_NAME = NoteSigner("mirror.zonex/log", LOG.key).verifier_key()
WRONG_KEY_ID = W[0].split("+")[0] + "+00000000+" + W[0].split("+", 2)[2]
ML_DSA = "pq.example/w+01020304+" + b64_encode(b"\x06" + bytes(1312))

REJECTIONS = [
    # (case, policy, line at fault, what the message says)
    ("empty", "", None, "no quorum line"),
    ("comments only", "# nothing\n\n", None, "no quorum line"),
    ("no quorum", f"witness A {W[0]}\n", None, "no quorum line"),
    ("unknown keyword", "quorum none\nwitnesses A B\n", 2, "unknown keyword 'witnesses'"),
    ("keywords are lowercase", "Quorum none\n", 1, "unknown keyword 'Quorum'"),
    ("log without key", "log\nquorum none\n", 1, "log <vkey> [<url>]"),
    ("log with two urls", f"log {L} https://a https://b\nquorum none\n", 1, "log <vkey>"),
    ("log key malformed", "log abc\nquorum none\n", 1, "log key: a verifier key is"),
    ("log key wrong id", f"log {L[:-1]}A\nquorum none\n", 1, "log key"),
    ("log key of witness type", f"log {W[0]}\nquorum none\n", 1, "signature type 0x04"),
    ("duplicate log", f"log {L}\nlog {L}\nquorum none\n", 2, "duplicate logs"),
    (
        "duplicate log under another name",
        f"log {L}\nlog {SAME_LOG_KEY_OTHER_NAME}\nquorum none\n",
        2,
        "has the public key of the log on line 1",
    ),
    ("witness without key", "witness A\nquorum A\n", 1, "witness <name> <vkey> [<url>]"),
    ("witness key of log type", f"witness A {L}\nquorum A\n", 1, "signature type 0x01"),
    ("witness key ML-DSA", f"witness A {ML_DSA}\nquorum A\n", 1, "signature type 0x06"),
    ("witness key id wrong", f"witness A {WRONG_KEY_ID}\nquorum A\n", 1, "does not match"),
    (
        "witness with too many fields",
        f"witness A {W[0]} https://a extra\nquorum A\n",
        1,
        "witness <name>",
    ),
    ("witness url looks like a comment", f"witness A {W[0]} #x\nquorum A\n", 1, "comment"),
    ("witness named none", f"witness none {W[0]}\nquorum none\n", 1, "'none' is predefined"),
    ("duplicate name", f"witness A {W[0]}\nwitness A {W[1]}\nquorum A\n", 2, "already defined"),
    (
        "duplicate witness key",
        f"witness A {W[0]}\nwitness B {W[0]}\nquorum A\n",
        2,
        "has the public key of witness A (line 1)",
    ),
    (
        "duplicate witness key under another key name",
        f"witness A {W[0]}\nwitness B {SAME_KEY_OTHER_NAME}\nquorum A\n",
        2,
        "one key is one witness",
    ),
    (
        "group named like a witness",
        f"witness A {W[0]}\ngroup A any A\nquorum A\n",
        2,
        "already defined on line 1",
    ),
    ("group named none", f"witness A {W[0]}\ngroup none any A\nquorum A\n", 2, "predefined"),
    ("group without members", f"witness A {W[0]}\ngroup G any\nquorum G\n", 2, "group <name>"),
    ("group without threshold", "group G\nquorum none\n", 1, "group <name> <k>|any|all"),
    ("threshold zero", f"witness A {W[0]}\ngroup G 0 A\nquorum G\n", 2, "out of range 1..1"),
    (
        "threshold above n",
        f"witness A {W[0]}\nwitness B {W[1]}\ngroup G 3 A B\nquorum G\n",
        3,
        "threshold 3 is out of range 1..2",
    ),
    (
        "threshold huge",
        f"witness A {W[0]}\ngroup G 99999999999999999999 A\nquorum G\n",
        2,
        "out of range",
    ),
    ("threshold negative", f"witness A {W[0]}\ngroup G -1 A\nquorum G\n", 2, "not 'any', 'all'"),
    ("threshold signed", f"witness A {W[0]}\ngroup G +1 A\nquorum G\n", 2, "not 'any', 'all'"),
    ("threshold word", f"witness A {W[0]}\ngroup G one A\nquorum G\n", 2, "not 'any', 'all'"),
    ("threshold case", f"witness A {W[0]}\ngroup G ANY A\nquorum G\n", 2, "not 'any', 'all'"),
    ("undefined member", f"witness A {W[0]}\ngroup G any A B\nquorum G\n", 2, "B is not defined"),
    (
        "forward reference",
        f"group G any A\nwitness A {W[0]}\nquorum G\n",
        1,
        "A is not defined above this line",
    ),
    (
        "cycle",
        f"witness A {W[0]}\ngroup G1 any A G2\ngroup G2 any G1\nquorum G2\n",
        2,
        "G2 is not defined above this line",
    ),
    ("group names itself", f"witness A {W[0]}\ngroup G any A G\nquorum G\n", 2, "G is not defined"),
    ("none as a member", f"witness A {W[0]}\ngroup G any A none\nquorum G\n", 2, "'none' cannot"),
    (
        "member twice in a group",
        f"witness A {W[0]}\ngroup G 1 A A\nquorum G\n",
        2,
        "A is listed twice in this group",
    ),
    (
        "witness in two groups",
        f"witness A {W[0]}\nwitness B {W[1]}\ngroup G1 all A B\ngroup G2 any B\nquorum G2\n",
        4,
        "B is already a member of group G1",
    ),
    (
        "group in two groups",
        f"witness A {W[0]}\ngroup G any A\ngroup H any G\ngroup I any G\nquorum I\n",
        4,
        "G is already a member of group H",
    ),
    ("quorum undefined", f"witness A {W[0]}\nquorum B\n", 2, "quorum B is not defined"),
    ("quorum forward reference", f"quorum A\nwitness A {W[0]}\n", 1, "quorum A is not defined"),
    ("two quorum lines", "quorum none\nquorum none\n", 2, "a second quorum line (the first is"),
    ("quorum with two names", f"witness A {W[0]}\nquorum A none\n", 2, "quorum <name>|none"),
    ("quorum without name", "quorum\n", 1, "quorum <name>|none"),
]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [pytest.param(text, line, reason, id=case) for case, text, line, reason in REJECTIONS],
)
def test_rejections(text: str, line: int | None, reason: str) -> None:
    err = rejected(text)
    assert err.line == line, err
    assert reason in err.reason, err
    assert str(err) == (err.reason if line is None else f"line {line}: {err.reason}")
    assert isinstance(err, ValueError)


# -- evaluation ------------------------------------------------------------------------------


def test_nested_k_of_n_of_groups() -> None:
    """Three organisations of two witnesses each, one of whose members is itself a group;
    the quorum is two of the three organisations."""
    w = [vkey(s) for s in POOL[:7]]
    policy = parse_policy(
        "".join(f"witness w{i} {w[i]}\n" for i in range(7))
        + "group city 2 w0 w1\n"
        + "group district-a any w2 w3\n"
        + "group district-b all w4 w5\n"
        + "group districts any district-a district-b\n"
        + "group street 1 w6\n"
        + "group chain 2 city districts street\n"
        + "quorum chain\n"
    )
    cases = {
        (): False,
        ("w0", "w1"): False,
        ("w0", "w1", "w6"): True,
        ("w0", "w6"): False,
        ("w2", "w6"): True,
        ("w4", "w6"): False,
        ("w4", "w5", "w0", "w1"): True,
        ("w3", "w4", "w5"): False,
    }
    for cosigners, ok in cases.items():
        assert policy.evaluate(cosigners).ok is ok, cosigners
    result = policy.evaluate(["w4", "w6"])
    assert "district-b" not in result.witnessed and "street" in result.witnessed
    assert [s.group for s in result.short] == [
        "chain",
        "city",
        "districts",
        "district-a",
        "district-b",
    ]
    assert str(result.short[4]) == "group district-b: 1 of 2 witnessed, 2 needed (missing w5)"


def test_any_and_all() -> None:
    policy_any = parse_policy(f"witness A {W[0]}\nwitness B {W[1]}\ngroup G any A B\nquorum G\n")
    policy_all = parse_policy(f"witness A {W[0]}\nwitness B {W[1]}\ngroup G all A B\nquorum G\n")
    for cosigners, any_ok, all_ok in (
        ((), False, False),
        (("A",), True, False),
        (("B",), True, False),
        (("A", "B"), True, True),
    ):
        assert policy_any.evaluate(cosigners).ok is any_ok
        assert policy_all.evaluate(cosigners).ok is all_ok


def test_quorum_of_one_witness() -> None:
    policy = parse_policy(f"log {L}\nwitness A {W[0]}\nwitness B {W[1]}\nquorum A\n")
    assert not check_quorum(cosign(note(), POOL[1]), policy).ok
    report = check_quorum(cosign(note(), POOL[1]), policy)
    assert report.explain() == "quorum A not met: no valid cosignature from witness A"
    assert check_quorum(cosign(note(), POOL[0]), policy).ok


def test_quorum_none_needs_no_cosignature_but_the_log_signature() -> None:
    policy = parse_policy(f"log {L}\nquorum none\n")
    assert check_quorum(note(), policy).ok
    with pytest.raises(VerificationError):
        check_quorum(note(log=OTHER_LOG), policy)


def test_group_names_do_not_count_as_cosigners() -> None:
    policy = parse_policy(f"witness A {W[0]}\ngroup G any A\nquorum G\n")
    assert not policy.evaluate(["G", "none", "stranger"]).ok


# -- cosignatures that must not count --------------------------------------------------------

TWO_OF_THREE = (
    f"log {L}\n"
    + "".join(f"witness w{i} {W[i]}\n" for i in range(3))
    + ("group q 2 w0 w1 w2\nquorum q\n")
)


def test_met_only_if_a_bad_cosignature_were_counted() -> None:
    policy = parse_policy(TWO_OF_THREE)
    text = cosign(note(), POOL[0])
    text += forged_line(text, POOL[1], STRANGER.key)  # w1's name and key ID, another key
    report = check_quorum(text, policy)
    assert not report.ok
    assert [c.name for c in report.cosigned] == ["w0"]
    assert list(report.invalid) == ["w1"]
    assert report.explain().startswith("quorum q not met: group q: 1 of 3 witnessed, 2 needed")
    assert "cosignatures that do not verify: w1 (bad Ed25519 signature)" in report.explain()


def test_altered_timestamp_does_not_count() -> None:
    policy = parse_policy(TWO_OF_THREE)
    base = cosign(note(), POOL[0])
    text = cosign(base, POOL[1])
    last = text[len(base) :]
    prefix, encoded = last.rsplit(" ", 1)
    blob = bytearray(b64_decode(encoded.strip()))
    blob[4:12] = (TIME + 1).to_bytes(8, "big")
    report = check_quorum(base + f"{prefix} {b64_encode(bytes(blob))}\n", policy)
    assert not report.ok and list(report.invalid) == ["w1"]


def test_cosignature_of_another_checkpoint_does_not_count() -> None:
    policy = parse_policy(TWO_OF_THREE)
    other = cosign(note(size=41), POOL[1])
    copied = other[len(note(size=41)) :]  # w1's line, made for size 41
    text = cosign(note(), POOL[0]) + copied
    report = check_quorum(text, policy)
    assert not report.ok and list(report.invalid) == ["w1"]


def test_a_bad_line_spoils_a_good_one_from_the_same_witness() -> None:
    policy = parse_policy(TWO_OF_THREE)
    text = cosign(note(), POOL[0], POOL[1])
    text += forged_line(text, POOL[1], STRANGER.key, TIME + 5)
    report = check_quorum(text, policy)
    assert not report.ok and list(report.invalid) == ["w1"]


def test_cosignatures_from_keys_outside_the_policy_are_ignored() -> None:
    policy = parse_policy(TWO_OF_THREE)
    # a stranger, and a witness of the policy's name but another key (so another key ID)
    impostor = NoteSigner(POOL[1].name, STRANGER.key)
    text = cosign(note(), POOL[0], STRANGER, impostor, POOL[3])
    report = check_quorum(text, policy)
    assert not report.ok and not report.invalid
    assert [c.name for c in report.cosigned] == ["w0"]
    assert check_quorum(cosign(text, POOL[2]), policy).ok


def test_one_key_is_one_witness() -> None:
    """Two names for one key would let one cosignature count twice: the spec refuses such
    policies ("Duplicate witnesses, i.e., multiple witness lines with the same public key, are
    not allowed"), whether parsed or built directly."""
    text = f"witness A {W[0]}\nwitness B {SAME_KEY_OTHER_NAME}\ngroup G all A B\nquorum G\n"
    assert "one key is one witness" in str(rejected(text))
    with pytest.raises(PolicyError, match="one key is one witness"):
        Policy(
            (),
            (
                PolicyWitness("A", cosigner(POOL[0])),
                PolicyWitness("B", NoteVerifier.from_verifier_key(SAME_KEY_OTHER_NAME)),
            ),
            (PolicyGroup("G", 2, ("A", "B")),),
            "G",
        )


# -- the log ---------------------------------------------------------------------------------


def test_any_listed_log_and_only_those() -> None:
    two_logs = parse_policy(f"log {L}\nlog {OTHER_LOG.verifier_key()}\nquorum none\n")
    assert check_quorum(note(log=OTHER_LOG), two_logs).log == OTHER_LOG.verifier()
    assert check_quorum(note(), two_logs).log == LOG.verifier()
    one_log = parse_policy(f"log {L}\nquorum none\n")
    with pytest.raises(VerificationError, match="no log of the policy signed the checkpoint"):
        check_quorum(note(log=OTHER_LOG), one_log)
    with pytest.raises(PolicyError, match=re.escape("does not list the log other.zonex/log")):
        check_quorum(note(log=OTHER_LOG), one_log, OTHER_LOG.verifier())
    # a listed log's name with another key is another log
    impostor = NoteSigner(ORIGIN, SigningKey(b"\x03" * 32))
    assert not one_log.lists_log(impostor.verifier())


def test_a_policy_without_logs_takes_the_log_from_context() -> None:
    policy = parse_policy(f"witness A {W[0]}\nquorum A\n")
    with pytest.raises(PolicyError, match="lists no log"):
        check_quorum(note(), policy)
    assert check_quorum(cosign(note(), POOL[0]), policy, LOG.verifier()).ok
    with pytest.raises(VerificationError):
        check_quorum(cosign(note(), POOL[0]), policy, OTHER_LOG.verifier())


def test_malformed_note() -> None:
    policy = parse_policy(f"log {L}\nquorum none\n")
    with pytest.raises(VerificationError, match="malformed note"):
        check_quorum("not a note", policy)


# -- policies built in code --------------------------------------------------------------------


def test_policy_built_directly_is_checked_like_a_file() -> None:
    a, b = PolicyWitness("A", cosigner(POOL[0])), PolicyWitness("B", cosigner(POOL[1]))
    policy = Policy((PolicyLog(LOG.verifier()),), (a, b), (PolicyGroup("G", 1, ("A", "B")),), "G")
    assert policy.evaluate(["B"]).ok
    cases: list[tuple[Callable[[], Policy], str]] = [
        (lambda: Policy((), (a,), (PolicyGroup("G", 2, ("A",)),), "G"), "out of range"),
        (lambda: Policy((), (a,), (PolicyGroup("G", 1, ()),), "G"), "at least one member"),
        (lambda: Policy((), (a,), (), "B"), "quorum B is not defined"),
        (lambda: Policy((), (a, a), (), "A"), "already defined"),
        (lambda: Policy((PolicyLog(cosigner(POOL[0])),), (), (), NONE), "type 0x01"),
        (lambda: Policy((), (PolicyWitness("A", POOL[0].verifier()),), (), "A"), "type 0x04"),
        (lambda: Policy((), (PolicyWitness("A B", cosigner(POOL[0])),), (), "A B"), "name"),
        # line numbers order the items: a group may not name a witness of a later line
        (
            lambda: Policy(
                (),
                (PolicyWitness("A", cosigner(POOL[0]), line=5),),
                (PolicyGroup("G", 1, ("A",), line=2),),
                "G",
                quorum_line=6,
            ),
            "line 2: A is not defined above this line",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(PolicyError, match=re.escape(message)):
            bad()


# -- property: evaluation equals a plain recursive evaluation --------------------------------


@st.composite
def nested_policies(
    draw: st.DrawFn,
) -> tuple[int, list[tuple[str, str, tuple[str, ...]]], str]:
    """Witnesses w0..w(n-1), groups over names not yet used as members (each name is a member
    at most once), and a quorum naming any defined name or ``none``."""
    n = draw(st.integers(1, len(POOL)))
    unused = [f"w{i}" for i in range(n)]
    groups: list[tuple[str, str, tuple[str, ...]]] = []
    for g in range(draw(st.integers(0, 6))):
        if not unused:
            break
        members = draw(st.lists(st.sampled_from(unused), min_size=1, unique=True))
        unused = [name for name in unused if name not in members]
        k = draw(st.sampled_from(["any", "all", *map(str, range(1, len(members) + 1))]))
        groups.append((f"g{g}", k, tuple(members)))
        unused.append(f"g{g}")
    quorum = draw(st.sampled_from([NONE, *(f"w{i}" for i in range(n)), *(g for g, _, _ in groups)]))
    return n, groups, quorum


def reference(name: str, groups: dict[str, tuple[str, tuple[str, ...]]], signed: set[str]) -> bool:
    if name == NONE:
        return True
    if name not in groups:
        return name in signed
    k, members = groups[name]
    need = 1 if k == "any" else len(members) if k == "all" else int(k)
    return sum(reference(member, groups, signed) for member in members) >= need


@settings(max_examples=150, deadline=None)
@given(
    shape=nested_policies(),
    signed=st.sets(st.integers(0, len(POOL) - 1)),
    forged=st.sets(st.integers(0, len(POOL) - 1)),
    blank=st.sampled_from([" ", "\t", "  \t "]),
)
def test_evaluation_equals_recursive_reference(
    shape: tuple[int, list[tuple[str, str, tuple[str, ...]]], str],
    signed: set[int],
    forged: set[int],
    blank: str,
) -> None:
    n, groups, quorum = shape
    lines = [f"log{blank}{L}"]
    lines += [f"witness{blank}w{i}{blank}{W[i]}" for i in range(n)]
    lines += [blank.join(["group", g, k, *members]) for g, k, members in groups]
    lines += [f"{blank}quorum{blank}{quorum}{blank}"]
    policy = parse_policy("\n".join(lines) + "\n")
    table = {g: (k, members) for g, k, members in groups}
    cosigners = {f"w{i}" for i in signed if i < n}
    expected = reference(quorum, table, cosigners)

    result = policy.evaluate(cosigners)
    assert result.ok is expected
    for g in table:
        assert (g in result.witnessed) is reference(g, table, cosigners)
    assert all(not reference(s.group, table, cosigners) for s in result.short)

    # the same through real cosignatures, with forged lines in the names of everyone else
    text = cosign(note(), *(POOL[i] for i in sorted(signed)))
    for i in sorted(forged - signed):
        text += forged_line(text, POOL[i], STRANGER.key)
    report = check_quorum(text, policy)
    assert report.ok is expected
    assert {c.name for c in report.cosigned} == cosigners
    assert set(report.invalid) == {f"w{i}" for i in forged - signed if i < n}
