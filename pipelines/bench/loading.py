"""Peak host memory of each process while treg-train loads its policy, two ways:

- `every-rank`: every process reads the whole checkpoint in fp32, then FSDP2 shards it (the plain way);
- `rank0`: treg's way, every process builds the model on the meta device and shards it, rank 0
  alone reads the checkpoint and sends each process its shards.

    python pipelines/bench/loading.py --size medium --processes 2

The checkpoint is saved in bf16, as Llama-3 and Gemma-2 are, so reading it as fp32 master weights
materialises a converted copy (an fp32 checkpoint would be memory-mapped and partly shared).
Each way runs in fresh processes under torchrun; the table gives each rank's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import local_model, peak_rss_gb  # noqa: E402

WAYS = ("every-rank", "rank0")


def saved_in(model: str, dtype: str) -> str:
    """A copy of the local model saved in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype == "float32":
        return model
    folder = Path(f"{model}-{dtype}")
    if not (folder / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(model, dtype=dtype).save_pretrained(folder)
        AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return str(folder)


def current_rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def load_and_report(model: str, way: str) -> None:
    """Runs inside torchrun: load, then print every rank's peak RSS from rank 0."""
    import torch
    import torch.distributed as dist

    from treg_core.forward import TokenLogprobs
    from treg_train.model import load_causal_lm, load_sharded, shard_model
    from treg_train.state import setup_distributed

    runtime = setup_distributed()
    baseline = current_rss_gb()  # torch, transformers and the process group, before any weight
    if way == "rank0":
        load_sharded(model, runtime.mesh, None)
    else:
        shard_model(TokenLogprobs(load_causal_lm(model, torch.float32)), runtime.mesh, None)
    peaks = [None] * runtime.world_size
    dist.all_gather_object(peaks, (baseline, peak_rss_gb()))
    if runtime.is_main:
        print("PEAKS " + json.dumps(peaks), flush=True)
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--work", default=".cache/bench")
    parser.add_argument("--checkpoint-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # set for the torchrun workers
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        return load_and_report(args.model, args.way)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = saved_in(local_model(work, args.size), args.checkpoint_dtype)
    import torch

    from treg_train.model import empty_causal_lm

    params = sum(p.numel() for p in empty_causal_lm(model).parameters())
    peaks = {}
    for way in WAYS:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 str(args.processes), __file__, "--way", way, "--model", model],
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        peaks[way] = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("PEAKS "))[6:])
    print(f"\nloading a {args.size} model saved in {args.checkpoint_dtype} ({params / 1e6:.0f} M parameters, "
          f"{4 * params / 2**30:.2f} GiB as fp32 master weights) "
          f"into {args.processes} processes, FSDP2 on {'cuda' if torch.cuda.is_available() else 'cpu'}\n")
    print("| rank | process baseline (GB) | peak, every rank reads (GB) | peak, rank 0 reads and sends shards (GB) "
          "| ratio | ratio above the baseline |")
    print("|---|---|---|---|---|---|")
    for rank in range(args.processes):
        (base, before), (_, after) = peaks["every-rank"][rank], peaks["rank0"][rank]
        print(f"| {rank} | {base:.2f} | {before:.2f} | {after:.2f} | "
              f"{after / before:.2f}× | {(after - base) / (before - base):.2f}× |")


if __name__ == "__main__":
    main()
