"""Helpers shared by the test modules: launching treg's commands as a user would, reading what
they wrote, and rendering pages in a real browser."""

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
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


def kill_after_first_checkpoint_and_resume(command: list, output: Path, step: int = 4) -> list[dict]:
    """Start a run (`command`, which saves a checkpoint at `step`), SIGKILL every process once that checkpoint
    is saved, then run it again with --resume; returns the metrics the two runs logged together."""
    process = subprocess.Popen([str(a) for a in command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (Path(output) / "checkpoints" / f"step-{step:08d}").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    for proc in [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True):
        proc.kill()
    process.wait()
    assert not (Path(output) / "final").exists()
    result = run([*command, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    return read_metrics(output)


def hf_score_config(model, data, output, **overrides) -> pipeline.ScoreConfig:
    """Small, fast scoring settings on the transformers back-end."""
    base = pipeline.ScoreConfig(model=model, dataset=str(data), output=str(output), backend="hf", dtype="float32",
                                max_length=256, max_prompt_length=128, batch_size=4, shard_size=8)
    return replace(base, **overrides)


def perturbed_copy(model, destination, seed: int = 0, scale: float = 0.02) -> str:
    """A stand-in for a DPO-trained model: `model`'s folder (tokenizer included) with every weight
    moved by seeded Gaussian noise, so its log-probs differ from `model`'s but not wildly."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(model, destination)
    weights = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in weights.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    weights.save_pretrained(destination)
    return str(destination)


def token_logprobs(model, rows: list[dict], side: str) -> list:
    """log π(y_t | prompt, y_<t) of each row's `side` response under `model`, by a plain
    transformers forward per sequence: independent of treg's batched kernel."""
    import torch
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    result = []
    with torch.no_grad():
        for row in rows:
            prompt, response = row["prompt_ids"], row[f"{side}_ids"]
            logits = network(torch.tensor([prompt + response])).logits[0].double()
            logps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
            result.append(logps.gather(1, torch.tensor(response)[:, None])[:, 0].numpy())
    return result


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
