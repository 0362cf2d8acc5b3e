"""FSDP2's two collectives over gloo: gloo's own, built from its all-reduce, and treg's pairwise exchanges
(treg_train.collectives), each on the same buffer, median of --repeats after one warm-up.

    python pipelines/bench/gloo_collectives.py --processes 2 --values 12000000

The buffer is one FSDP2 unit's: --values fp32 (or --dtype) values gathered, or gradients reduced. Each process
runs on one thread, as treg-train's processes do on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _time(fn, repeats: int) -> float:
    import torch.distributed as dist

    fn()
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _worker(rank: int, args, store: str) -> None:
    import torch
    import torch.distributed as dist

    from treg_train.collectives import PairwiseAllGather, PairwiseReduceScatter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.processes)
    group, size = dist.group.WORLD, args.processes
    dtype = getattr(torch, args.dtype)
    whole = torch.randn(args.values // size * size).to(dtype)
    shard = torch.empty(whole.numel() // size, dtype=dtype)
    gather_rows = {
        "gloo all_gather_into_tensor": lambda: dist.all_gather_into_tensor(whole, shard),
        "gloo all_reduce of the whole buffer (the shard, zeros elsewhere)": lambda: dist.all_reduce(whole),
        "treg pairwise all-gather": lambda: PairwiseAllGather()(whole, shard, group),
    }
    reduce_rows = {  # FSDP2 asks gloo for an average
        "gloo reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(shard, whole, op=dist.ReduceOp.AVG),
        "gloo all_reduce of the whole buffer, then the chunk": lambda: dist.all_reduce(whole, op=dist.ReduceOp.AVG),
        "treg pairwise reduce-scatter": lambda: PairwiseReduceScatter()(shard, whole, group, dist.ReduceOp.AVG),
    }
    rows = [(kind, name, _time(fn, args.repeats)) for kind, table in (("all-gather", gather_rows),
                                                                      ("reduce-scatter", reduce_rows))
            for name, fn in table.items()]
    if rank == 0:
        megabytes = whole.numel() * whole.element_size() / 1e6
        print(f"{args.processes} processes, a buffer of {whole.numel():,} {args.dtype} values ({megabytes:.0f} MB)")
        print("| collective | how | ms |")
        print("|---|---|---|")
        for kind, name, seconds in rows:
            print(f"| {kind} | {name} | {seconds * 1e3:.1f} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--values", type=int, default=12_000_000, help="values in the whole (gathered) buffer")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as work:
        mp.spawn(_worker, args=(args, str(Path(work) / "store")), nprocs=args.processes)


if __name__ == "__main__":
    main()
