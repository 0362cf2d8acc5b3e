"""Smoke runs of the benchmark scripts at tiny size: they run and print their tables."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "pipelines" / "bench"


def _run(script, *args):
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_scaling_benchmark(tmp_path):
    out = _run("scaling.py", "--sizes", "300,600", "--work", str(tmp_path))
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("300", "600"))]
    assert [(r[0], r[2]) for r in rows] == [("300", "reader"), ("300", "data"), ("600", "reader"), ("600", "data")]
    assert rows[0][3] == "300" and rows[2][3] == "600"  # the reader saw every pair


def test_gloo_collectives_benchmark():
    out = _run("gloo_collectives.py", "--processes", "2", "--values", "1000", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith(("| all-gather |", "| reduce-scatter |"))]
    assert len(rows) == 6 and sum("treg pairwise" in row for row in rows) == 2


@pytest.mark.slow
def test_training_benchmark_against_trl(tmp_path):
    out = _run("train_vs_trl.py", "--size", "tiny", "--pairs", "32", "--steps", "3", "--batch", "4",
               "--max-length", "256", "--processes", "2", "--work", str(tmp_path),
               "--sides", "trl_gc,trl,defaults")
    rows = [line for line in out.splitlines() if line.startswith(("1 ", "2 "))]
    assert len(rows) == 3 and sum("(TRL best)" in row for row in rows) == 1  # 2 TRL rows and treg's defaults
    for row in rows:
        checkpointing = "every layer" if "gradient_checkpointing (its default)" in row or "true" in row else "none"
        assert checkpointing in row, row  # the checkpointing each row really ran, TRL's default named
        assert len(re.findall(r"\d\.\d\dx", row)) == 4, row  # against TRL at the same checkpointing, and TRL's best
    assert "vs TRL same ckpt" in out and "failed" not in out


@pytest.mark.engine
def test_scoring_benchmark(tmp_path):
    out = _run("scoring.py", "--size", "tiny", "--pairs", "20", "--sizes", "10,20", "--work", str(tmp_path),
               "--enforce-eager")
    assert "treg vLLM scorer (cached_prefix_rows)" in out and "transformers reference" in out
    assert "treg scorer over plain prefill" in out and "the prefix cache served" in out


@pytest.mark.slow
def test_loading_benchmark(tmp_path):
    out = _run("loading.py", "--size", "tiny", "--processes", "2", "--work", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and "rank 0 reads and sends shards" in out


@pytest.mark.slow
def test_lora_memory_benchmark(tmp_path):
    out = _run("lora_memory.py", "--size", "tiny", "--pairs", "32", "--steps", "3", "--batch", "4",
               "--max-length", "256", "--work", str(tmp_path))
    rows = [line for line in out.splitlines() if line.startswith(("| full fine-tuning |", "| LoRA r=16 |"))]
    assert len(rows) == 2 and "peak memory while training" in out
