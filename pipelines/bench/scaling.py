"""Memory of the training data path against dataset size: it should stay flat.

Writes synthetic shards (the real schema and metadata, random tokens) of each size, then, in a
fresh process per size, streams one epoch through (a) the shard reader alone and (b) the whole
data path of a training step (global batches, rank slice, token-budget micro-batches,
collation), and reports peak RSS.

    python pipelines/bench/scaling.py --sizes 1000,10000,100000
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


def write_synthetic(folder: Path, pairs: int, seed: int = 0) -> None:
    from treg_data.contract import METADATA_KEY, SCHEMA, SIDES, side_columns
    from treg_data.shards import ROW_GROUP_SIZE

    if (folder / "done").exists():
        return
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard, start in enumerate(range(0, pairs, SHARD_ROWS)):
        n = min(SHARD_ROWS, pairs - start)

        def lists(lengths, values):
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

        messages = pa.array([[{"role": "user", "content": "synthetic"}]] * n, type=SCHEMA.field("prompt").type)
        columns = {"id": pa.array([f"s{start + i}" for i in range(n)]), "prompt": messages, "chosen": messages,
                   "rejected": messages}
        prompt_len = rng.integers(20, 200, n)
        columns["prompt_ids"] = lists(prompt_len, rng.integers(0, 500, prompt_len.sum()).astype(np.int32))
        for side in SIDES:
            length = rng.integers(20, 300, n)
            for name in side_columns(side):
                values = rng.integers(0, 500, length.sum()).astype(np.int32) if name.endswith("_ids") else \
                    rng.normal(-2, 1, length.sum()).astype(np.float32)
                columns[name] = lists(length, values)
        meta = {"provenance": {"tokenizer_hash": "synthetic"}, "shard": {"rows": n}}
        table = pa.table(columns, schema=SCHEMA).replace_schema_metadata({METADATA_KEY: json.dumps(meta)})
        pq.write_table(table, folder / "data" / f"train-00000-of-00001-{shard:05d}.parquet",
                       compression="zstd", row_group_size=ROW_GROUP_SIZE)
    shards = sorted(f"data/{p.name}" for p in (folder / "data").glob("*.parquet"))
    manifest = {"shards": shards, "counts": {"pairs_scored": pairs}}  # what training checks
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "done").write_text("")


def measure(folder: str, what: str) -> dict:
    from treg_train.collate import collate
    from treg_train.data import ShardDataset, global_batches, micro_batches, rank_slice

    start = time.perf_counter()
    dataset = ShardDataset(folder)
    pairs = 0
    if what == "reader":
        for coordinate in dataset.order(seed=0, epoch=0, buffer_size=10_000):
            dataset.read(*coordinate)
            pairs += 1
    else:
        batches = global_batches(dataset, seed=0, global_batch_size=128, buffer_size=10_000)
        for _ in range(dataset.num_pairs // 128):
            _, _, coordinates = next(batches)
            mine = [dataset.read(*c) for c in rank_slice(coordinates, 0, 8)]  # one rank of eight
            for micro in micro_batches(mine, 16384, padding_free=True):
                collate(micro, padding_free=True)
            pairs += len(mine)
    return {"pairs": pairs, "seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--work", default="/tmp/treg-bench-scaling")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(*args.measure)))
        return
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        folder = Path(args.work) / f"pairs-{size}"
        write_synthetic(folder, size)
        disk = sum(f.stat().st_size for f in (folder / "data").glob("*.parquet")) / 2**20
        for what in ("reader", "data path"):
            done = subprocess.run([sys.executable, __file__, "--measure", str(folder), what.replace(" ", "_")],
                                  capture_output=True, text=True, check=True)
            result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
            rows.append((size, disk, what, result))
    print("\nsynthetic shards: prompts 20-200 tokens, responses 20-300 tokens, 10k-row shards, 1k-row groups; "
          "shuffle buffer 10k; data path = global batch 128, one rank of 8, 16k-token packed micro-batches")
    print(f"{'pairs':>8}{'shards MB':>11}  {'stage':<10}{'pairs read':>11}{'seconds':>9}{'peak RSS GB':>13}")
    for size, disk, what, r in rows:
        print(f"{size:>8}{disk:>11.1f}  {what:<10}{r['pairs']:>11}{r['seconds']:>9.1f}{r['peak_rss_gb']:>13.3f}")


if __name__ == "__main__":
    main()
