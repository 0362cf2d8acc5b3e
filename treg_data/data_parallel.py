"""`treg-score --data-parallel-size N`: N scoring workers on one node, one engine each.

Worker r of this node is worker `worker_index * N + r` of `num_workers * N` in the ordinary
worker scheme (contiguous input slices, one output folder, manifests merged by the last to
finish), so a folder scored this way equals one scored by N separate `--worker-index` runs.
Each worker sees only its own devices: `tensor_parallel_size` GPUs, or on a CPU its own share of
the cores for the engine's OpenMP threads (two engines bound to the same cores would halve both).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from collections import Counter
from dataclasses import replace

from treg_core.errors import UserError
from treg_data.scorers.cpu_engine import data_parallel_cpu_environments, split_evenly
from treg_data.scorers.watchdog import RESUME, WATCHDOG_INTERVAL


def run_data_parallel(config, size: int):
    """Score with `size` worker processes and return one Summary for all of them."""
    from treg_data.pipeline import Summary

    configs = [replace(config, num_workers=config.num_workers * size, worker_index=config.worker_index * size + r)
               for r in range(size)]
    environments = worker_environments(size, config.tensor_parallel_size)
    context = multiprocessing.get_context("spawn")  # the engine cannot live in a forked process
    results = context.Queue()
    started = time.perf_counter()
    workers = [context.Process(target=_worker, args=(c, env, results), name=f"treg-score-worker-{c.worker_index}")
               for c, env in zip(configs, environments)]
    for worker in workers:
        worker.start()
    summaries = []
    try:
        while len(summaries) < len(workers):
            try:
                kind, value = results.get(timeout=5)
            except queue.Empty:  # a worker killed from outside (OOM, kill -9) reports nothing
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise UserError(f"{dead[0].name} died (exit code {dead[0].exitcode}); {RESUME}") from None
                continue
            if kind == "error":
                raise UserError(value)
            summaries.append(value)
    finally:
        for worker in workers:
            if len(summaries) < len(workers):  # the worker and its engine's processes, wherever they are now
                _kill_group(worker.pid)
            worker.join()
    manifest = next((s.manifest for s in summaries if s.manifest is not None), None)
    skipped = sum((Counter(s.skipped_by_reason) for s in summaries), Counter())
    return Summary(
        output=summaries[0].output, pairs_read=sum(s.pairs_read for s in summaries),
        pairs_scored=sum(s.pairs_scored for s in summaries), skipped_by_reason=dict(skipped),
        tokens=sum(s.tokens for s in summaries), seconds=time.perf_counter() - started,
        score_seconds=max(s.score_seconds for s in summaries),  # the workers score side by side
        scoring_path=summaries[0].scoring_path, manifest=manifest,
        pairs_scored_now=sum(s.pairs_scored_now for s in summaries),
        duplicate_ids=sum(s.duplicate_ids for s in summaries),  # within each worker's rows
    )


def worker_environments(size: int, tensor_parallel_size: int) -> list[dict[str, str]]:
    """What each worker's environment adds: its own GPUs, or on a CPU its own cores and share of memory."""
    import torch

    if not torch.cuda.is_available():
        return data_parallel_cpu_environments(size, tensor_parallel_size)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(devices) < size * tensor_parallel_size:
        raise UserError(f"--data-parallel-size {size} x --tensor-parallel-size {tensor_parallel_size} needs "
                        f"{size * tensor_parallel_size} GPUs; {len(devices)} are visible")
    groups = split_evenly(devices, size * tensor_parallel_size)
    return [{"CUDA_VISIBLE_DEVICES": ",".join(sum(groups[r * tensor_parallel_size:(r + 1) * tensor_parallel_size],
                                                   []))} for r in range(size)]


def _kill_group(pid: int | None) -> None:
    """A worker leads a process group of its own with its engine's processes: end them all, so that none is left
    holding memory when the worker itself was killed (its children then outlive it)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, TypeError):
        pass


def _worker(config, environment: dict[str, str], results) -> None:
    os.setsid()  # a process group of its own, which its engine's processes join: _kill_group
    os.environ.update(environment)
    from treg_data import pipeline

    try:
        results.put(("ok", pipeline.run(config)))
    except UserError as err:
        results.put(("error", f"worker {config.worker_index}: {err}"))
    except BaseException as err:
        if isinstance(err, Exception):  # vLLM's own error for a killed engine may come first: let the watchdog,
            time.sleep(2 * WATCHDOG_INTERVAL)  # which names the engine that died, end this process before it is told
        results.put(("error", f"worker {config.worker_index} failed: {type(err).__name__}: {err}"))
        raise
