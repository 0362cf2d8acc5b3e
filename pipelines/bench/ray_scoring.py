"""Stage one three ways on the same pairs and model, each as the whole treg-score command a user runs (engine
starts, and Ray's, included): one local worker, --data-parallel-size N, and --executor ray --num-actors N.

    python pipelines/bench/ray_scoring.py --size small --pairs 400 --backend vllm --enforce-eager
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SIZES, local_model, pairs_file  # noqa: E402


def ways(workers: int) -> dict[str, list[str]]:
    """Each way of running stage one: its name and the flags that choose it."""
    return {
        "one local worker": [],
        f"--data-parallel-size {workers}": ["--data-parallel-size", str(workers)],
        f"--executor ray --num-actors {workers}": ["--executor", "ray", "--num-actors", str(workers)],
    }


def timed_run(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--workers", type=int, default=2, help="data-parallel workers, and Ray actors")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--work", default="/tmp/treg-bench-ray-scoring")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation (faster start)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = local_model(work, args.size), pairs_file(work, args.pairs)
    common = ["--model", model, "--dataset", str(data), "--backend", args.backend, "--dtype", args.dtype,
              "--batch-size", str(args.batch_size), "--max-length", "512", "--max-prompt-length", "256",
              "--no-reward-check", *(["--enforce-eager"] if args.enforce_eager else [])]
    timings = []
    for index, (name, flags) in enumerate(ways(args.workers).items()):
        output = work / f"scored-{index}"
        shutil.rmtree(output, ignore_errors=True)  # a finished folder would be scored in no time
        command = [sys.executable, "-m", "treg_data.cli", *common, "--output", str(output), *flags]
        timings.append((name, timed_run(command)))

    print(f"\nmodel {args.size} ({model}) | {args.pairs} pairs | backend {args.backend} | {args.dtype} | "
          f"{os.cpu_count()} CPU cores | whole commands: engine starts (and Ray's) included")
    print(f"{'way':<36}{'seconds':>9}{'pairs/s':>10}{'vs one worker':>15}")
    for name, seconds in timings:
        print(f"{name:<36}{seconds:>9.1f}{args.pairs / seconds:>10.1f}{timings[0][1] / seconds:>14.2f}x")


if __name__ == "__main__":
    main()
