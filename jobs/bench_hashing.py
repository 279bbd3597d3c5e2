"""Collision rates of the XXH64 id hash against theory, and TorchRec's MCH module.

For uniform and Zipf-distributed raw ids and several table sizes, the job
hashes a sample of lookups with :func:`kd_dagfm.hashing.hash_to_rows` and
prints, side by side with the expectation for a uniform hash:

- the id collision rate: distinct ids that share their row with another;
- the lookup collision rate: lookups whose row contains another distinct id
  (mean over several hash seeds, since the hottest ids decide much of it);
- the rows the ids occupy.

It also times the hash (ids/s) and, for one table size, runs TorchRec's
managed-collision module (``MCHManagedCollisionModule``, LFU eviction) on
the same Zipf stream: it gives frequent ids rows of their own and sends the
ids it holds no row for to one shared row. Run::

    .venv/bin/python -m jobs.bench_hashing
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from kd_dagfm.data.zipf import sample_zipf_ranks
from kd_dagfm.hashing import (
    expected_collision_rate,
    expected_occupied_rows,
    hash_to_rows,
    measure_collisions,
)

logger = logging.getLogger("jobs.bench_hashing")


def draw_ids(distribution: str, lookups: int, vocabulary: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        return rng.integers(1, vocabulary + 1, size=lookups, dtype=np.int64)
    exponent = float(distribution.split("-")[1])
    return sample_zipf_ranks(rng, lookups, vocabulary, exponent)


def collision_rows(
    ids: np.ndarray, table_sizes: Sequence[int], hash_seeds: int
) -> list[dict[str, Any]]:
    rows = []
    for table_rows in table_sizes:
        runs = [measure_collisions(ids, table_rows, seed) for seed in range(hash_seeds)]
        distinct = runs[0].distinct_ids
        rows.append(
            {
                "table_rows": table_rows,
                "distinct_ids": distinct,
                "expected_collision_rate": expected_collision_rate(
                    distinct, table_rows
                ),
                "id_collision_rate": float(
                    np.mean([r.id_collision_rate for r in runs])
                ),
                "lookup_collision_rate": float(
                    np.mean([r.lookup_collision_rate for r in runs])
                ),
                "lookup_collision_rate_min": min(r.lookup_collision_rate for r in runs),
                "lookup_collision_rate_max": max(r.lookup_collision_rate for r in runs),
                "occupied_rows": float(np.mean([r.occupied_rows for r in runs])),
                "expected_occupied_rows": expected_occupied_rows(distinct, table_rows),
            }
        )
    return rows


def hash_throughput(count: int) -> dict[str, float]:
    """ids/s of hash_to_rows for int64 ids and 8-character hex strings."""
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 2**62, size=count, dtype=np.int64)
    strings = pa.array([f"{v:08x}" for v in ints[: count // 4] & 0xFFFFFFFF])
    timings = {}
    for name, ids, n in (("int64", ints, count), ("string8", strings, count // 4)):
        started = time.perf_counter()
        hash_to_rows(ids, 1_000_000_007, seed=1)
        timings[name] = n / (time.perf_counter() - started)
    return timings


def mch_collisions(
    ids: np.ndarray, table_rows: int, batch_size: int, train_fraction: float
) -> dict[str, Any]:
    """Train TorchRec's MCH module on the first part of ``ids``, then map the
    rest in eval mode and count lookups on rows shared by distinct ids."""
    import torch
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.modules.mc_modules import (
        LFU_EvictionPolicy,
        ManagedCollisionCollection,
        MCHManagedCollisionModule,
    )

    config = EmbeddingBagConfig(
        name="t", embedding_dim=8, num_embeddings=table_rows, feature_names=["f"]
    )
    module = MCHManagedCollisionModule(
        zch_size=table_rows,
        device=torch.device("cpu"),
        eviction_policy=LFU_EvictionPolicy(),
        eviction_interval=1,
        input_hash_size=2**62,
    )
    collection = ManagedCollisionCollection({"t": module}, [config])

    def remap(values: np.ndarray) -> np.ndarray:
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f"],
            values=torch.from_numpy(values),
            lengths=torch.ones(values.size, dtype=torch.int32),
        )
        return collection(kjt)["f"].values().numpy()

    split = int(ids.size * train_fraction)
    started = time.perf_counter()
    collection.train()
    for start in range(0, split, batch_size):
        remap(ids[start : start + batch_size])
    train_s = time.perf_counter() - started
    collection.eval()
    test = ids[split:]
    rows = np.concatenate(
        [remap(test[s : s + batch_size]) for s in range(0, test.size, batch_size)]
    )
    distinct, inverse = np.unique(test, return_inverse=True)
    pairs = np.unique(np.stack([rows, test]), axis=1)  # distinct (row, id)
    ids_per_row = np.bincount(pairs[0], minlength=table_rows)
    shared = ids_per_row[rows] > 1
    hashed = hash_to_rows(test, table_rows, seed=0)
    hashed_pairs = np.unique(np.stack([hashed, test]), axis=1)
    hashed_shared = np.bincount(hashed_pairs[0], minlength=table_rows)[hashed] > 1
    return {
        "table_rows": table_rows,
        "train_lookups": split,
        "eval_lookups": int(test.size),
        "eval_distinct_ids": int(distinct.size),
        "mch_lookup_collision_rate": float(shared.mean()),
        "mch_rows_used": int((ids_per_row > 0).sum()),
        "hash_lookup_collision_rate": float(hashed_shared.mean()),
        "mch_train_lookups_per_s": split / train_s,
    }


def format_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| ids | table rows | distinct ids | id collision rate (expected / "
        "measured) | lookup collision rate, mean over seeds (min-max) | "
        "occupied rows (expected / measured) |",
        "|---|---|---|---|---|---|",
    ]
    for distribution, rows in result["collisions"].items():
        for row in rows:
            lines.append(
                f"| {distribution} | {row['table_rows']:,} | {row['distinct_ids']:,} | "
                f"{row['expected_collision_rate']:.4f} / {row['id_collision_rate']:.4f} | "
                f"{row['lookup_collision_rate']:.4f} ({row['lookup_collision_rate_min']:.4f}"
                f"-{row['lookup_collision_rate_max']:.4f}) | "
                f"{row['expected_occupied_rows']:,.0f} / {row['occupied_rows']:,.0f} |"
            )
    speed = result["throughput_ids_per_s"]
    lines.append("")
    lines.append(
        f"hash_to_rows: {speed['int64'] / 1e6:.1f} M int64 ids/s, "
        f"{speed['string8'] / 1e6:.1f} M 8-character string ids/s (one thread)"
    )
    mch = result.get("mch")
    if mch:
        lines.append("")
        lines.append(
            f"MCH vs hash, {mch['table_rows']:,} rows, Zipf ids: MCH trained on "
            f"{mch['train_lookups']:,} lookups ({mch['mch_train_lookups_per_s']:,.0f} "
            f"lookups/s), then {mch['eval_lookups']:,} lookups of "
            f"{mch['eval_distinct_ids']:,} distinct ids: lookup collision rate "
            f"{mch['mch_lookup_collision_rate']:.4f} (MCH, {mch['mch_rows_used']:,} "
            f"rows used) vs {mch['hash_lookup_collision_rate']:.4f} (hash)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.bench_hashing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--lookups", type=int, default=2_000_000, help="sampled lookups"
    )
    parser.add_argument(
        "--vocabulary", type=int, default=10_000_000, help="raw ids drawn from"
    )
    parser.add_argument(
        "--table_rows",
        default="100000,1000000,10000000,100000000",
        help="comma-separated table sizes",
    )
    parser.add_argument("--hash_seeds", type=int, default=5, help="hash seeds averaged")
    parser.add_argument(
        "--mch_rows", type=int, default=100_000, help="MCH table size (0: skip)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sizes = [int(n) for n in args.table_rows.split(",")]

    result: dict[str, Any] = {"collisions": {}}
    for distribution in ("uniform", "zipf-1.05", "zipf-1.2"):
        ids = draw_ids(distribution, args.lookups, args.vocabulary, seed=7)
        logger.info("%s: %d lookups", distribution, ids.size)
        result["collisions"][distribution] = collision_rows(ids, sizes, args.hash_seeds)
    result["throughput_ids_per_s"] = hash_throughput(4_000_000)
    if args.mch_rows:
        ids = draw_ids("zipf-1.05", min(args.lookups, 1_000_000), args.vocabulary, 8)
        result["mch"] = mch_collisions(ids, args.mch_rows, 4096, 0.5)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    print(format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
