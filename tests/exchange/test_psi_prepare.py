"""The epoch preparation's kernel (:mod:`exchange.psi_epoch`): the zone's keyed order, the
image's fingerprints written chunk by chunk (on one core or several, on a Dask cluster: the
same bytes), resumption from the last recorded chunk, and the sort for lookup.

Every image is checked against one computed here the long way: ``crypto.psi.blind`` over the
ids in the order of their keyed BLAKE2b tags, then SHA-256 of each point cut to 96 bits.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crypto import psi as cpsi
from exchange import psi_epoch
from exchange.errors import InvalidInputError
from exchange.psi_epoch import (
    FP_DTYPE,
    blind_image,
    epoch_domain,
    fingerprints,
    keyed_order,
    sort_image,
    usable_ids,
)
from exchange.psi_protocol import normalize_id

N = 9_000
#: two chunks, the second short
CHUNK = 5_000
EPOCH = "ep_kernel"


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    ids = [f"C{i:09d}" for i in range(N)]
    key, seed = cpsi.PsiKey.generate(), b"\x07" * 32
    tags = [hashlib.blake2b(i.encode(), key=seed, digest_size=16).digest() for i in ids]
    order = sorted(range(N), key=tags.__getitem__)
    points = cpsi.blind(key, epoch_domain(EPOCH), [ids[i].encode() for i in order])
    return {
        "ids": ids,
        "key": key,
        "seed": seed,
        "order": order,
        "image": fingerprints(points).tobytes(),
    }


def test_keyed_order_is_the_order_of_the_keyed_tags(world: dict[str, Any]) -> None:
    assert keyed_order(world["seed"], world["ids"]) == world["order"]
    # another seed, another secret order; none of them the order the ids came in
    other = keyed_order(b"\x08" * 32, world["ids"])
    assert other != world["order"] and sorted(other) == list(range(N))
    assert world["order"] != list(range(N))
    assert keyed_order(world["seed"], []) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_one_or_more_cores_write_the_same_image(
    world: dict[str, Any], tmp_path: Path, workers: int
) -> None:
    told: list[tuple[int, float]] = []
    path = tmp_path / "image.fp"
    finished = blind_image(
        world["key"],
        world["seed"],
        EPOCH,
        world["ids"],
        path,
        chunk=CHUNK,
        workers=workers,
        on_chunk=lambda done, rate: told.append((done, rate)),
    )
    assert finished
    assert path.read_bytes() == world["image"]
    assert [done for done, _ in told] == [CHUNK, N]
    assert all(rate > 0 for _, rate in told)
    # the epoch key is in no file the preparation writes
    assert world["key"].to_bytes() not in path.read_bytes()


def test_resumes_from_the_last_recorded_chunk(world: dict[str, Any], tmp_path: Path) -> None:
    args = (world["key"], world["seed"], EPOCH, world["ids"], tmp_path / "image.fp")
    told: list[int] = []
    assert not blind_image(*args, chunk=CHUNK, max_chunks=1, on_chunk=lambda d, _: told.append(d))
    assert told == [CHUNK]
    assert args[4].read_bytes() == world["image"][: CHUNK * FP_DTYPE.itemsize]
    # a run killed while writing the next chunk left part of it behind: it is written again
    with args[4].open("ab") as f:
        f.write(b"\xff" * 1000)
    assert blind_image(*args, start=CHUNK, chunk=CHUNK, on_chunk=None)
    assert args[4].read_bytes() == world["image"]
    # done is done: nothing is blinded again, the file is left as it is
    assert blind_image(*args, start=N, chunk=CHUNK, on_chunk=lambda d, _: told.append(d))
    assert told == [CHUNK] and args[4].read_bytes() == world["image"]
    # sorted for lookup, each fingerprint with its position in the zone's order
    fp, pos = sort_image(args[4])
    assert pos.dtype == np.uint32 and sorted(pos.tolist()) == list(range(N))
    keys = list(zip(fp["hi"].tolist(), fp["lo"].tolist(), strict=True))
    assert keys == sorted(keys) and len(set(keys)) == N
    image = np.frombuffer(world["image"], dtype=FP_DTYPE)
    assert (fp == image[pos]).all()


def test_a_different_key_or_epoch_gives_an_unrelated_image(
    world: dict[str, Any], tmp_path: Path
) -> None:
    ids = world["ids"][:200]
    base = (world["seed"], EPOCH, ids)
    blind_image(world["key"], *base, tmp_path / "a")
    blind_image(cpsi.PsiKey.generate(), *base, tmp_path / "b")
    blind_image(world["key"], world["seed"], "ep_other", ids, tmp_path / "c")
    a, b, c = (np.fromfile(tmp_path / n, dtype=FP_DTYPE).tolist() for n in "abc")
    assert not set(a) & set(b) and not set(a) & set(c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": N + 1}, "outside"),
        ({"start": -1}, "outside"),
        ({"chunk": 0}, "chunk"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_are_refused(
    world: dict[str, Any], tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        blind_image(world["key"], world["seed"], EPOCH, world["ids"], tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_a_dask_cluster_writes_the_same_image(world: dict[str, Any], tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    path = tmp_path / "image.fp"
    args = (world["key"], world["seed"], EPOCH, world["ids"], path)
    # the first chunk here, the rest on the cluster: one file
    assert not blind_image(*args, chunk=CHUNK, max_chunks=1)
    told: list[int] = []
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        assert blind_image(
            *args,
            start=CHUNK,
            chunk=CHUNK,
            scheduler=cluster.scheduler_address,
            on_chunk=lambda d, _: told.append(d),
        )
        assert told == [N]
        assert path.read_bytes() == world["image"]
        # and the whole of it from the start, with a stop after one chunk
        path.unlink()
        assert not blind_image(
            *args, chunk=CHUNK, max_chunks=1, scheduler=cluster.scheduler_address
        )
        assert path.read_bytes() == world["image"][: CHUNK * FP_DTYPE.itemsize]
        assert blind_image(*args, start=CHUNK, chunk=CHUNK, scheduler=cluster.scheduler_address)
        assert path.read_bytes() == world["image"]


def test_an_unreachable_scheduler_is_one_readable_error(
    world: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("distributed")
    with pytest.raises(
        psi_epoch.ClusterError, match=r"scheduler at tcp://127\.0\.0\.1:9 is unreachable"
    ):
        psi_epoch.blind_image(
            world["key"],
            world["seed"],
            EPOCH,
            world["ids"][:10],
            tmp_path / "x",
            scheduler="tcp://127.0.0.1:9",
        )


def test_usable_ids_are_what_a_session_reads() -> None:
    # distinct column values as a store returns them: plain, to be normalized, refused
    values: list[object] = [
        "C1",
        " C1 ",  # stripped: the same id as C1
        "e\u0301",  # NFC: é
        "\u00e9",
        "tab\there",  # a control character: skipped, counted
        "zero\u200bwidth",  # a format character: skipped, counted
        "x" * 513,  # too long: skipped, counted
        "x" * 512,
        "  ",  # no id at all: neither kept nor counted
        None,
        42,  # an integer subject column
        "inner space",
    ]
    ids, skipped = usable_ids(values, max_items=10)
    expected: dict[str, None] = {}
    refused = 0
    for v in values:
        try:
            ident = normalize_id(v)
        except InvalidInputError:
            refused += 1
            continue
        if ident is not None:
            expected[ident] = None
    assert ids == list(expected) == ["C1", "\u00e9", "x" * 512, "42", "inner space"]
    assert skipped == refused == 3
    with pytest.raises(InvalidInputError, match="too many subjects"):
        usable_ids([f"C{i}" for i in range(11)], max_items=10)
    assert len(usable_ids([f"C{i}" for i in range(10)], max_items=10)[0]) == 10


def test_the_command_line_says_what_scheduler_needs() -> None:
    from typer.testing import CliRunner

    from exchange.cli import app

    out = CliRunner().invoke(
        app,
        ["psi", "prepare", "tax", "--dataset", "companies", "--scheduler", "tcp://127.0.0.1:9"],
        env={"COLUMNS": "200"},
    )
    assert out.exit_code == 1
    assert "--scheduler needs --node" in out.output and "Traceback" not in out.output
