"""The id hash against the reference XXH64, and collision rates against theory."""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from kd_dagfm.errors import ConfigError
from kd_dagfm.hashing import (
    IdHasher,
    expected_collision_rate,
    expected_occupied_rows,
    hash_to_rows,
    measure_collisions,
    rows_for_collision_rate,
    xxh64,
)

SEEDS = [0, 1, 2022, -5, 2**63 + 7]


def _random_strings(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcdef0123456789-_xyzé✓")
    lengths = rng.integers(0, 140, size=count)
    return ["".join(rng.choice(alphabet, size=n)) for n in lengths]


def test_xxh64_known_value() -> None:
    # XXH64 of the empty input with seed 0, from the xxHash test vectors.
    assert int(xxh64([""], 0)[0]) == 0xEF46DB3751D8E999


@pytest.mark.parametrize("seed", SEEDS)
def test_xxh64_strings_match_reference(seed: int) -> None:
    strings = ["", "a", "68fd1e64", "héllo wörld ✓", *_random_strings(2000, 7)]
    expected = [xxhash.xxh64_intdigest(s.encode(), seed % 2**64) for s in strings]
    assert xxh64(strings, seed).tolist() == expected
    assert xxh64(pa.array(strings, pa.large_string()), seed).tolist() == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_xxh64_ints_match_reference(seed: int) -> None:
    rng = np.random.default_rng(3)
    ids = np.concatenate(
        [
            np.array([0, 1, -1, 2**63 - 1, -(2**63)], dtype=np.int64),
            rng.integers(-(2**63), 2**63 - 1, size=3000, dtype=np.int64),
        ]
    )
    expected = [
        xxhash.xxh64_intdigest(struct.pack("<q", int(i)), seed % 2**64) for i in ids
    ]
    assert xxh64(ids, seed).tolist() == expected
    assert xxh64(pa.array(ids), seed).tolist() == expected
    # Unsigned ids hash like their two's-complement signed twins.
    assert xxh64(ids.view(np.uint64), seed).tolist() == expected


def test_xxh64_arrow_slices_and_chunks() -> None:
    strings = _random_strings(70_000, 11)  # more than one internal chunk
    expected = xxh64(strings, 5)
    array = pa.array(strings)
    assert (xxh64(array.slice(100, 500), 5) == expected[100:600]).all()
    chunked = pa.chunked_array([strings[:1234], strings[1234:]])
    assert (xxh64(chunked, 5) == expected).all()
    binary = pa.array([s.encode() for s in strings[:300]], pa.binary())
    assert (xxh64(binary, 5) == expected[:300]).all()
    assert (xxh64(np.array(strings[:300]), 5) == expected[:300]).all()


def test_hash_to_rows_range_and_seeds() -> None:
    ids = np.arange(100_000, dtype=np.int64)
    rows = hash_to_rows(ids, 1000, seed=3)
    assert rows.dtype == np.int64
    assert rows.min() >= 0
    assert rows.max() < 1000
    assert (hash_to_rows(ids, 1000, seed=3) == rows).all()
    assert (hash_to_rows(ids, 1000, seed=4) != rows).mean() > 0.99
    counts = np.bincount(rows, minlength=1000)
    # 100 ids per row on average; a uniform hash stays within 5 sigma.
    assert counts.min() > 100 - 5 * 10
    assert counts.max() < 100 + 5 * 10


def test_id_hasher_reproduces_with_reference() -> None:
    hasher = IdHasher(num_embeddings=1_000_003, seed=42)
    rows = hasher(pa.array(["68fd1e64", "80e26c9b"]))
    for raw, row in zip(["68fd1e64", "80e26c9b"], rows.tolist()):
        assert row == xxhash.xxh64_intdigest(raw.encode(), 42) % 1_000_003
    assert hasher.to_dict() == {
        "algorithm": "xxh64",
        "seed": 42,
        "num_embeddings": 1_000_003,
    }


def test_hash_rejects_nulls_and_floats() -> None:
    with pytest.raises(ConfigError, match="cannot hash 1 null ids"):
        xxh64(pa.array(["a", None]))
    with pytest.raises(ConfigError, match="cannot hash ids of dtype float64"):
        xxh64(np.array([1.5]))
    with pytest.raises(ConfigError, match="invalid num_embeddings 0"):
        hash_to_rows([1], 0)


def test_uniform_collisions_match_expectation() -> None:
    rng = np.random.default_rng(0)
    ids = rng.choice(2**62, size=20_000, replace=False)
    for rows in (10_000, 100_000, 1_000_000):
        stats = measure_collisions(ids, rows, seed=1)
        assert stats.distinct_ids == 20_000
        expected = expected_collision_rate(20_000, rows)
        assert stats.id_collision_rate == pytest.approx(expected, abs=0.01)
        # Every id occurs once, so lookups and ids collide alike.
        assert stats.lookup_collision_rate == pytest.approx(stats.id_collision_rate)
        occupied = expected_occupied_rows(20_000, rows)
        assert stats.occupied_rows == pytest.approx(occupied, rel=0.01)


def test_zipf_lookup_collisions_match_expectation() -> None:
    # The hash does not see frequencies, so a lookup's chance of sharing its
    # row equals a distinct id's. One hash seed decides the few hottest ids'
    # fate for a large share of lookups, so the lookup rate is averaged over
    # 30 seeds (standard error about 0.02 here).
    rng = np.random.default_rng(1)
    ids = rng.zipf(1.2, size=200_000)
    runs = [measure_collisions(ids, 50_000, seed=seed) for seed in range(30)]
    expected = expected_collision_rate(runs[0].distinct_ids, 50_000)
    for stats in runs:
        assert stats.id_collision_rate == pytest.approx(expected, abs=0.02)
    lookup_rate = float(np.mean([s.lookup_collision_rate for s in runs]))
    assert lookup_rate == pytest.approx(expected, abs=0.07)


def test_expected_collision_rate_formula() -> None:
    assert expected_collision_rate(1, 10) == 0.0
    assert expected_collision_rate(2, 10) == pytest.approx(0.1)
    assert expected_collision_rate(3, 2) == pytest.approx(0.75)
    # n = m = 1e9: 1 - (1 - 1/m)^(m - 1) -> 1 - 1/e.
    assert expected_collision_rate(10**9, 10**9) == pytest.approx(1 - np.exp(-1))


def test_rows_for_collision_rate_inverts_the_rate() -> None:
    for ids, rate in [(1000, 0.01), (10**6, 0.05), (10**9, 0.1)]:
        rows = rows_for_collision_rate(ids, rate)
        assert expected_collision_rate(ids, rows) <= rate
        assert expected_collision_rate(ids, rows - 1) > rate
    with pytest.raises(ConfigError, match="invalid collision_rate 1.5"):
        rows_for_collision_rate(10, 1.5)
