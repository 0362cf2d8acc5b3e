"""Helpers shared by the test modules: launching treg's commands as a user would, reading what
they wrote, and rendering pages in a real browser."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from treg_data import pipeline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def run(args, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def score_command(*args) -> list:
    return [sys.executable, "-m", "treg_data.cli", *args]


def train_command(*args, processes: int = 1) -> list:
    """treg-train in this process's Python, under torchrun for several processes."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return launcher + ["-m", "treg_train", *args]


def hf_score_config(model, data, output, **overrides) -> pipeline.ScoreConfig:
    """Small, fast scoring settings on the transformers back-end."""
    base = pipeline.ScoreConfig(model=model, dataset=str(data), output=str(output), backend="hf", dtype="float32",
                                max_length=256, max_prompt_length=128, batch_size=4, shard_size=8)
    return replace(base, **overrides)


def read_shard_rows(output) -> list[dict]:
    return pq.read_table(Path(output) / "data").to_pylist()


def read_metrics(output) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]


def render_in_chromium(page: Path, tmp_path: Path) -> str:
    """The DOM after headless Chromium has loaded the page (the network is off: the page must need none)."""
    assert Path(CHROMIUM).exists(), "headless Chromium is needed: apt-get install chromium"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
