"""Shared pieces of the benchmark scripts: models built locally, pairs from the shipped data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(1, str(ROOT / "pipelines"))  # tiny_model
SIZES = {
    "tiny": {},  # 2 layers, hidden 128, vocab 512
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1408, model_vocab_size=32000),
    # a real model's hidden / vocabulary ratio: hidden 1024, vocab 32k (~170 M parameters)
    "medium": dict(hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=2816, model_vocab_size=32000),
}


def local_model(work: Path, size: str) -> str:
    from tiny_model import build_tiny_model

    folder = work / f"model-{size}"
    if not (folder / "config.json").exists():
        build_tiny_model(folder, **SIZES[size])
    return str(folder)


def pairs_file(work: Path, n: int) -> Path:
    """n pairs cycling through the shipped quickstart pairs, each with its own id."""
    shipped = (ROOT / "pipelines/data/quickstart-pairs.jsonl").read_text().splitlines()
    path = work / f"pairs-{n}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            row = json.loads(shipped[i % len(shipped)])
            row["id"] = f"bench-{i}"
            handle.write(json.dumps(row) + "\n")
    return path


def peak_rss_gb() -> float:
    """This process's peak resident memory, as treg-train logs it on a CPU."""
    import torch

    from treg_train.metrics import peak_memory_gb

    return peak_memory_gb(torch.device("cpu"))
