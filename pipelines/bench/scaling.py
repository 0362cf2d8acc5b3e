"""Memory of the training data path against dataset size: it should stay flat.

Writes synthetic shards (the real schema and metadata, random tokens) of each size, then, in a
fresh process per size and stage, streams one epoch through (a) the shard reader alone: every pair
read and kept through the shuffle buffer, as a single process does, and (b) the whole data path
of a training step for rank 0 of 8 (global batches, the rank's share, token-budget micro-batches,
collation), and reports peak RSS and how many row groups were read.

    python pipelines/bench/scaling.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_gb  # noqa: E402

SHARD_ROWS = 10_000
STAGES = ("reader", "data path")


def synthetic_provenance():
    from treg_core.contract import Provenance

    return Provenance(
        model="synthetic", model_revision=None, scorer_model="synthetic", dpo_model=None, reverse_dpo_model=None,
        ref_topk=0, ce_scores=False, tokenizer_hash="synthetic", dataset="synthetic", dataset_config=None,
        input_fingerprint="synthetic", split="train", columns={}, token_rewards="contrastive", revision_prompts={},
        reward_transform="synthetic",
        max_length=2048, max_prompt_length=1800, max_model_len=4096, backend="synthetic", dtype="float32",
        num_workers=1, shard_size=SHARD_ROWS, treg_version="synthetic")


def write_synthetic(folder: Path, pairs: int, seed: int = 0) -> None:
    """Shards of `pairs` pairs. Token values are slices of one pool of random numbers at random offsets:
    as incompressible as fresh ones, and fast enough for a million pairs."""
    from treg_core.contract import (
        FORMAT,
        METADATA_KEY,
        SCHEMA,
        SIDES,
        Counts,
        Manifest,
        ShardInfo,
        ShardMetadata,
        side_columns,
    )
    from treg_data.shards import ROW_GROUP_SIZE

    if (folder / "done").exists():
        return
    provenance = synthetic_provenance()
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = {"ids": rng.integers(0, 500, 4 * 2**20, dtype=np.int32),  # values in their columns' ranges
            "logps": -np.abs(rng.normal(2, 1, 4 * 2**20)).astype(np.float32),
            "rewards": rng.uniform(-0.5, 0.5, 4 * 2**20).astype(np.float32)}
    messages = pa.array([[{"role": "user", "content": "synthetic"}]] * SHARD_ROWS, type=SCHEMA.field("prompt").type)

    def lists(lengths, kind):
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        start = rng.integers(0, len(pool[kind]) - offsets[-1])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(pool[kind][start:start + offsets[-1]]))

    for shard, start in enumerate(range(0, pairs, SHARD_ROWS)):
        n = min(SHARD_ROWS, pairs - start)
        columns = {"id": pa.array([f"s{start + i}" for i in range(n)]), "prompt": messages[:n],
                   "chosen": messages[:n], "rejected": messages[:n]}
        columns["prompt_ids"] = lists(rng.integers(20, 200, n), "ids")
        for side in SIDES:
            length = rng.integers(20, 300, n)
            for name in side_columns(side):
                columns[name] = lists(length, name.rsplit("_", 1)[-1])  # ids, logps or rewards
        meta = ShardMetadata(provenance, ShardInfo(start, start + n, n, 0, [])).to_dict()
        table = pa.table(columns, schema=SCHEMA).replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
        pq.write_table(table, folder / "data" / f"train-00000-of-00001-{shard:05d}.parquet",
                       compression="zstd", row_group_size=ROW_GROUP_SIZE)
    shards = sorted(f"data/{p.name}" for p in (folder / "data").glob("*.parquet"))
    manifest = Manifest(FORMAT, provenance, Counts(pairs, pairs, 0, {}, 0), shards, [], ["synthetic"], None)
    (folder / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    (folder / "done").write_text("")


def measure(folder: str, stage: str) -> dict:
    from treg_train.collate import collate, micro_batches
    from treg_train.index import ShardIndex
    from treg_train.readers import TrainingStream

    start = time.perf_counter()
    dataset = ShardIndex(folder)
    stream = TrainingStream(dataset, seed=0, buffer_size=10_000)
    pairs = 0
    if stage == "reader":
        every_row = np.ones(dataset.total_rows, dtype=bool)
        pairs = sum(1 for _ in stream.pairs(epoch=0, marked=every_row))
    else:
        batches = stream.global_batches(128, rank=0, world_size=8)
        for _ in range(dataset.num_pairs // 128):
            _, _, mine = next(batches)
            for micro in micro_batches(mine, 16384, padding_free=True):
                collate(micro, padding_free=True)
            pairs += len(mine)
    return {"pairs": pairs, "groups_read": dataset.groups_read, "groups": len(dataset.groups),
            "seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}


def short(size: int) -> str:
    return f"{size // 10**6}M" if size % 10**6 == 0 else f"{size // 1000}k" if size % 1000 == 0 else str(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--work", default="/tmp/treg-bench-scaling")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(*args.measure)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for size in sizes:
        folder = Path(args.work) / f"pairs-{size}"
        write_synthetic(folder, size)
        disk = sum(f.stat().st_size for f in (folder / "data").glob("*.parquet")) / 2**20
        for stage in STAGES:
            done = subprocess.run([sys.executable, __file__, "--measure", str(folder), stage],
                                  capture_output=True, text=True, check=True)
            result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
            results[size, stage] = disk, result
    print("\nsynthetic shards: prompts 20-200 tokens, responses 20-300 tokens, 10k-row shards, 1k-row groups; "
          "shuffle buffer 10k; reader = every pair read and kept (rank 0 of 1); data path = global batch 128, "
          "rank 0 of 8, 16k-token packed micro-batches")
    print(f"{'pairs':>8}{'shards MB':>11}  {'stage':<10}{'pairs read':>11}{'row groups read':>17}"
          f"{'seconds':>9}{'peak RSS GB':>13}")
    for (size, stage), (disk, r) in results.items():
        groups = f"{r['groups_read']} of {r['groups']}"
        print(f"{size:>8}{disk:>11.1f}  {stage:<10}{r['pairs']:>11}{groups:>17}{r['seconds']:>9.1f}"
              f"{r['peak_rss_gb']:>13.3f}")
    if len(sizes) > 1:
        for stage in STAGES:
            ratio = results[sizes[-1], stage][1]["peak_rss_gb"] / results[sizes[0], stage][1]["peak_rss_gb"]
            print(f"{stage}: peak RSS {short(sizes[-1])} vs {short(sizes[0])}: {ratio:.2f}×")


if __name__ == "__main__":
    main()
