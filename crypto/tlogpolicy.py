"""C2SP tlog-policy: the logs and witnesses a verifier trusts, and the witness quorum a checkpoint
must meet (https://github.com/C2SP/C2SP/blob/main/tlog-policy.md).

A policy file is lines of octets; items are separated by spaces and tabs; empty lines and lines
whose first non-blank character is ``#`` are ignored::

    log <vkey> [<url>]                     a log; its vkey's key name is the log's origin
    witness <name> <vkey> [<url>]          a cosigner; a cosignature/v1 vkey (type 0x04)
    group <name> <k>|any|all <member>...   witnessed when k of its members witnessed
    quorum <name>|none                     exactly once

A name is defined once (``none`` is predefined), a group or the quorum names only witnesses and
groups defined on earlier lines (so there are no cycles), and a name is a group member at most
once in the whole file, so that each witness counts towards the quorum in one way only. Two
logs or two witnesses that wrap the same public key are refused: one key is one witness.

Names are opaque octet strings (no Unicode normalization): they are held as ``str`` decoded
with ``surrogateescape``, which maps distinct octet strings to distinct strings.

:func:`parse_policy` reads a file, :meth:`Policy.evaluate` decides a quorum for a set of
witnesses, and :func:`check_quorum` verifies a checkpoint note's log signature and
cosignatures and evaluates the quorum. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from crypto.encoding import b64_decode
from crypto.errors import CryptoError, EncodingError, VerificationError
from crypto.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    Checkpoint,
    Cosignature,
    NoteVerifier,
    check_cosigners,
    verify_checkpoint,
)

#: the predefined name of the empty quorum: no cosignature is required
NONE = "none"
#: far beyond the 32 logs, 32 witnesses and 32 groups the spec asks implementations to support
MAX_POLICY_BYTES = 1 << 20

# only tab and newline among the controls (newline ends the line, so it is never inside one)
_BAD_OCTET = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BLANKS = re.compile(r"[ \t]+")  # not str.split(): no other (Unicode) white space separates
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_BAD_NAME = re.compile(r"[\x00-\x20\x7f]")


class PolicyError(CryptoError, ValueError):
    """A policy that breaks the tlog-policy format, or that does not fit what it is used with.

    ``line`` is the 1-based line at fault, ``None`` for the policy as a whole.
    """

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason = reason
        self.line = line


def show(name: str) -> str:
    """A name for a message: octets that are not UTF-8 as ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# -- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLog:
    """A ``log`` line: the log's Ed25519 note key (type 0x01), named by its origin."""

    verifier: NoteVerifier
    url: str | None = None
    line: int = 0


@dataclass(frozen=True)
class PolicyWitness:
    """A ``witness`` line: a name local to the policy and a cosignature/v1 key (type 0x04)."""

    name: str
    verifier: NoteVerifier
    url: str | None = None
    line: int = 0


@dataclass(frozen=True)
class PolicyGroup:
    """A ``group`` line: witnessed when at least ``threshold`` of ``members`` witnessed."""

    name: str
    threshold: int
    members: tuple[str, ...]
    line: int = 0


@dataclass(frozen=True)
class Shortfall:
    """A group that did not witness: ``have`` of its members did, ``need`` were required."""

    group: str
    have: int
    need: int
    missing: tuple[str, ...]

    def __str__(self) -> str:
        size = self.have + len(self.missing)
        return (
            f"group {show(self.group)}: {self.have} of {size} witnessed, {self.need} needed "
            f"(missing {', '.join(map(show, self.missing))})"
        )


@dataclass(frozen=True)
class QuorumResult:
    """Whether a set of witnesses meets a policy's quorum.

    ``witnessed`` holds every witness and group that witnessed; ``short`` the groups that did
    not, from the quorum down through each member group that fell short.
    """

    quorum: str
    ok: bool
    witnessed: frozenset[str]
    short: tuple[Shortfall, ...]

    def explain(self) -> str:
        """One line: met, or which groups are short and by what."""
        if self.quorum == NONE:
            return "quorum none: no cosignature required"
        if self.ok:
            return f"quorum {show(self.quorum)} met"
        if not self.short:  # the quorum is a single witness
            return (
                f"quorum {show(self.quorum)} not met: no valid cosignature from witness "
                f"{show(self.quorum)}"
            )
        return f"quorum {show(self.quorum)} not met: " + "; ".join(map(str, self.short))


@dataclass(frozen=True)
class Policy:
    """A parsed policy. Build one with :func:`parse_policy`, or directly: the constructor
    checks the same rules (items are taken in ``line`` order, then logs, witnesses, groups and
    the quorum in that order) and raises :class:`PolicyError`."""

    logs: tuple[PolicyLog, ...]
    witnesses: tuple[PolicyWitness, ...]
    groups: tuple[PolicyGroup, ...]
    quorum: str
    quorum_line: int = 0
    _order: tuple[PolicyGroup, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        builder = _Builder()
        items: list[PolicyLog | PolicyWitness | PolicyGroup | str] = [
            *self.logs,
            *self.witnesses,
            *self.groups,
            self.quorum,
        ]
        for item in sorted(items, key=lambda i: self.quorum_line if isinstance(i, str) else i.line):
            builder.add(item, self.quorum_line)
        builder.finish()
        object.__setattr__(self, "_order", tuple(builder.groups))

    @property
    def witness_names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.witnesses)

    def lists_log(self, log: NoteVerifier) -> bool:
        """Whether ``log`` (name and public key) is one of the policy's logs."""
        return any(_same_log(entry.verifier, log) for entry in self.logs)

    def evaluate(self, cosigners: Iterable[str]) -> QuorumResult:
        """Whether the witnesses named in ``cosigners`` meet the quorum.

        Names that are not witnesses of this policy (groups included) count for nothing.
        """
        known = set(self.witness_names)
        witnessed = {name for name in cosigners if name in known}
        # groups only name what came before them: one pass in definition order decides all
        for group in self._order:
            if sum(member in witnessed for member in group.members) >= group.threshold:
                witnessed.add(group.name)
        ok = self.quorum == NONE or self.quorum in witnessed
        short: list[Shortfall] = []
        groups = {group.name: group for group in self._order}
        pending = [] if ok or self.quorum not in groups else [groups[self.quorum]]
        while pending:
            group = pending.pop(0)
            missing = tuple(m for m in group.members if m not in witnessed)
            short.append(
                Shortfall(group.name, len(group.members) - len(missing), group.threshold, missing)
            )
            pending.extend(groups[m] for m in missing if m in groups)
        return QuorumResult(self.quorum, ok, frozenset(witnessed), tuple(short))


def _same_log(a: NoteVerifier, b: NoteVerifier) -> bool:
    return a.name == b.name and a.key.raw == b.key.raw


class _Builder:
    """The rules that span lines, applied one item at a time in file order."""

    def __init__(self) -> None:
        self.defined: dict[str, int] = {NONE: 0}  # name -> the line defining it
        self.member_of: dict[str, str] = {}  # name -> the group that lists it
        self.log_keys: dict[bytes, int] = {}
        self.witness_keys: dict[bytes, PolicyWitness] = {}
        self.witnesses: set[str] = set()
        self.groups: list[PolicyGroup] = []
        self.quorum_line: int | None = None

    def add(self, item: PolicyLog | PolicyWitness | PolicyGroup | str, quorum_line: int) -> None:
        if isinstance(item, PolicyLog):
            self._log(item)
        elif isinstance(item, PolicyWitness):
            self._witness(item)
        elif isinstance(item, PolicyGroup):
            self._group(item)
        else:
            self._quorum(item, quorum_line)

    def finish(self) -> None:
        if self.quorum_line is None:
            raise PolicyError("no quorum line (a policy has exactly one, e.g. 'quorum none')")

    def _define(self, name: object, line: int, what: str) -> str:
        if not isinstance(name, str) or not name or _BAD_NAME.search(name):
            raise PolicyError(f"a {what} name is a non-empty word without controls", line)
        if name == NONE:
            raise PolicyError(f"'{NONE}' is predefined and cannot name a {what}", line)
        if name in self.defined:
            raise PolicyError(f"{show(name)} is already defined on line {self.defined[name]}", line)
        self.defined[name] = line
        return name

    def _log(self, log: PolicyLog) -> None:
        _check_key(log.verifier, ALG_ED25519, "log", log.line)
        _check_url(log.url, log.line)
        raw = log.verifier.key.raw
        if raw in self.log_keys:
            raise PolicyError(
                f"log {log.verifier.name} has the public key of the log on line "
                f"{self.log_keys[raw]} (duplicate logs are not allowed)",
                log.line,
            )
        self.log_keys[raw] = log.line

    def _witness(self, witness: PolicyWitness) -> None:
        _check_key(witness.verifier, ALG_COSIGNATURE_V1, "witness", witness.line)
        _check_url(witness.url, witness.line)
        name = self._define(witness.name, witness.line, "witness")
        raw = witness.verifier.key.raw
        other = self.witness_keys.get(raw)
        if other is not None:
            # the Ed25519 cosigned message does not name the witness: one key is one witness
            raise PolicyError(
                f"witness {show(name)} has the public key of witness {show(other.name)} "
                f"(line {other.line}); one key is one witness",
                witness.line,
            )
        self.witness_keys[raw] = witness
        self.witnesses.add(name)

    def _group(self, group: PolicyGroup) -> None:
        line = group.line
        members = group.members
        if not isinstance(members, tuple) or not members:
            raise PolicyError("a group has at least one member", line)
        threshold = group.threshold
        if (
            not isinstance(threshold, int)
            or isinstance(threshold, bool)
            or not 1 <= threshold <= len(members)
        ):
            raise PolicyError(
                f"threshold {threshold} is out of range 1..{len(members)} (its number of members)",
                line,
            )
        listed: set[str] = set()
        for member in members:
            if member == NONE:
                raise PolicyError(f"'{NONE}' cannot be a group member", line)
            if not isinstance(member, str) or member not in self.defined:
                raise PolicyError(
                    f"{show(str(member))} is not defined above this line (a group names only "
                    "witnesses and groups defined on earlier lines)",
                    line,
                )
            if member in listed:
                raise PolicyError(f"{show(member)} is listed twice in this group", line)
            if member in self.member_of:
                raise PolicyError(
                    f"{show(member)} is already a member of group "
                    f"{show(self.member_of[member])} (a name is a group member at most once)",
                    line,
                )
            listed.add(member)
        name = self._define(group.name, line, "group")
        for member in members:
            self.member_of[member] = name
        self.groups.append(group)

    def _quorum(self, name: str, line: int) -> None:
        if self.quorum_line is not None:
            raise PolicyError(f"a second quorum line (the first is line {self.quorum_line})", line)
        if not isinstance(name, str) or name not in self.defined:
            raise PolicyError(
                f"quorum {show(str(name))} is not defined above this line (name a witness or "
                f"group defined earlier, or '{NONE}')",
                line,
            )
        self.quorum_line = line


def _check_key(verifier: object, want: int, what: str, line: int) -> None:
    if not isinstance(verifier, NoteVerifier) or verifier.signature_type != want:
        raise PolicyError(f"a {what} key is a NoteVerifier of type 0x{want:02x}", line)


def _check_url(url: object, line: int) -> None:
    if url is None:
        return
    if not isinstance(url, str) or not url or _BAD_NAME.search(url):
        raise PolicyError("a URL is a non-empty word without controls", line)
    if url.startswith("#"):
        raise PolicyError("a comment takes a line of its own ('#' first on the line)", line)


# -- parsing -----------------------------------------------------------------------------------

_KEY_TYPES = {
    ALG_ED25519: "Ed25519 note signature",
    ALG_COSIGNATURE_V1: "cosignature/v1, Ed25519",
}


def _parse_vkey(token: str, want: int, what: str, line: int) -> NoteVerifier:
    """A vkey of signature type ``want``, with a message a policy's author can act on."""
    kind = f"a {what} key is a vkey <name>+<key id>+<base64(0x{want:02x} || public key)>"
    parts = token.split("+", 2)
    if len(parts) == 3:
        try:
            material = b64_decode(parts[2])
        except EncodingError:
            material = b""
        if material and material[0] != want:
            known = _KEY_TYPES.get(material[0])
            label = f" ({known})" if known else ""
            raise PolicyError(
                f"{what} key has signature type 0x{material[0]:02x}{label}; {kind} "
                f"({_KEY_TYPES[want]})",
                line,
            )
    try:
        verifier = NoteVerifier.from_verifier_key(token)
    except EncodingError as exc:
        raise PolicyError(f"{what} key: {exc}; {kind}", line) from exc
    if verifier.signature_type != want:  # pragma: no cover - the type was checked above
        raise PolicyError(kind, line)
    return verifier


def _threshold(word: str, members: int, line: int) -> int:
    if word == "any":
        return 1
    if word == "all":
        return members
    if not _DIGITS.fullmatch(word):
        raise PolicyError(f"threshold {show(word)} is not 'any', 'all' or a decimal number", line)
    # a number too long to be in range is still out of range, not something else
    return int(word) if len(word) <= 9 else 10**9


_SYNTAX = {
    "log": "log <vkey> [<url>]",
    "witness": "witness <name> <vkey> [<url>]",
    "group": "group <name> <k>|any|all <member>...",
    "quorum": "quorum <name>|none",
}


def parse_policy(data: bytes | str) -> Policy:
    """Parse a policy file in the C2SP tlog-policy format; raise :class:`PolicyError` naming
    the first line at fault (``str`` input is taken as its UTF-8 octets)."""
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PolicyError("policy text is not encodable as UTF-8") from exc
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy is larger than {MAX_POLICY_BYTES} bytes")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line (a last line without one is read too)
    builder = _Builder()
    logs: list[PolicyLog] = []
    witnesses: list[PolicyWitness] = []
    groups: list[PolicyGroup] = []
    quorum: tuple[str, int] | None = None
    for number, raw in enumerate(lines, start=1):
        bad = _BAD_OCTET.search(raw)
        if bad is not None:
            raise PolicyError(
                f"control character 0x{bad.group()[0]:02x} (only tab and newline are allowed)",
                number,
            )
        text = raw.decode("utf-8", "surrogateescape").strip(" \t")
        if not text or text.startswith("#"):
            continue
        keyword, *args = _BLANKS.split(text)
        syntax = _SYNTAX.get(keyword)
        if syntax is None:
            raise PolicyError(
                f"unknown keyword {show(keyword)!r} (a line is log, witness, group or quorum; "
                "'#' starts a comment line)",
                number,
            )
        item: PolicyLog | PolicyWitness | PolicyGroup | str
        if keyword == "log" and 1 <= len(args) <= 2:
            verifier = _parse_vkey(args[0], ALG_ED25519, "log", number)
            item = PolicyLog(verifier, args[1] if len(args) == 2 else None, number)
            logs.append(item)
        elif keyword == "witness" and 2 <= len(args) <= 3:
            verifier = _parse_vkey(args[1], ALG_COSIGNATURE_V1, "witness", number)
            item = PolicyWitness(args[0], verifier, args[2] if len(args) == 3 else None, number)
            witnesses.append(item)
        elif keyword == "group" and len(args) >= 3:
            members = tuple(args[2:])
            item = PolicyGroup(args[0], _threshold(args[1], len(members), number), members, number)
            groups.append(item)
        elif keyword == "quorum" and len(args) == 1:
            item = args[0]
            builder.add(item, number)
            quorum = (item, number)
            continue
        else:
            raise PolicyError(f"a {keyword} line is: {syntax}", number)
        builder.add(item, number)
    builder.finish()
    assert quorum is not None  # finish() refuses a policy without one
    return Policy(tuple(logs), tuple(witnesses), tuple(groups), quorum[0], quorum[1])


# -- checking a checkpoint -------------------------------------------------------------------


@dataclass(frozen=True)
class QuorumReport:
    """A checkpoint a policy's log signed, and how its cosignatures meet the quorum.

    ``cosigned`` names (by their policy names) the witnesses whose cosignatures verified, with
    the latest timestamp; ``invalid`` maps each witness with a line that did not verify to why.
    Such a witness does not count, even if another of its lines verified.
    """

    checkpoint: Checkpoint
    log: NoteVerifier
    cosigned: tuple[Cosignature, ...]
    invalid: Mapping[str, str]
    result: QuorumResult

    @property
    def ok(self) -> bool:
        return self.result.ok

    def explain(self) -> str:
        """One line: the quorum met (and by whom) or which groups are short, and any
        cosignatures from the policy's witnesses that did not verify."""
        line = self.result.explain()
        if self.result.ok and self.cosigned:
            line += f", cosigned by {', '.join(show(c.name) for c in self.cosigned)}"
        if self.invalid:
            line += "; cosignatures that do not verify: " + ", ".join(
                f"{show(name)} ({why})" for name, why in self.invalid.items()
            )
        return line


def _verify_log(
    note: str, policy: Policy, log: NoteVerifier | None
) -> tuple[Checkpoint, NoteVerifier]:
    if log is not None:
        if policy.logs and not policy.lists_log(log):
            raise PolicyError(f"the policy does not list the log {log.name}")
        return verify_checkpoint(note, log), log
    if not policy.logs:
        raise PolicyError("the policy lists no log: give the log's key")
    problems = []
    for entry in policy.logs:
        try:
            return verify_checkpoint(note, entry.verifier), entry.verifier
        except VerificationError as exc:
            problems.append(f"{entry.verifier.name}: {exc}")
    raise VerificationError("no log of the policy signed the checkpoint: " + "; ".join(problems))


def check_quorum(note: str, policy: Policy, log: NoteVerifier | None = None) -> QuorumReport:
    """Verify a checkpoint note's log signature, then evaluate the policy's quorum over the
    cosignatures that verify.

    The log is ``log`` when given (the policy must list it, unless it lists no log at all: the
    spec lets the log be known from context), else any log of the policy. Lines from keys the
    policy does not name are ignored. Raises :class:`VerificationError` if the log's
    signature does not verify (or the note is malformed) and :class:`PolicyError` if ``log`` is
    not the policy's.
    """
    checkpoint, signer = _verify_log(note, policy, log)
    results = check_cosigners(note, [w.verifier for w in policy.witnesses])
    cosigned = []
    invalid: dict[str, str] = {}
    for witness, result in zip(policy.witnesses, results, strict=True):
        if result.problem is not None:
            invalid[witness.name] = result.problem
        elif result.timestamp is not None:
            cosigned.append(Cosignature(witness.name, result.timestamp))
    evaluation = policy.evaluate(c.name for c in cosigned)
    return QuorumReport(checkpoint, signer, tuple(cosigned), invalid, evaluation)
