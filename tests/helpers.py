"""Helpers shared by the test modules: the test data, launching treg's commands as a user would,
reading what they wrote, and rendering pages in a real browser."""

import json
import random
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


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Valid pairs in every shape users have: plain strings, conversational with an explicit
    prompt, implicit prompt in multi-turn conversations, unicode and edge whitespace."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        good, bad = f"The sum of {a} and {b} is {a + b}.", f"The sum of {a} and {b} is {a + b + rng.randint(1, 9)}."
        kind = i % 4
        if kind == 0:
            rows.append({"id": f"pair-{i}", "prompt": f"What is {a} plus {b}?", "chosen": good, "rejected": bad})
        elif kind == 1:
            user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Add {a} and {b}."}]
            rows.append({"id": f"pair-{i}", "prompt": user,
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        elif kind == 2:
            history = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                       {"role": "user", "content": f"Compute {a} + {b}, please."}]
            rows.append({"id": f"pair-{i}",
                         "chosen": history + [{"role": "assistant", "content": good}],
                         "rejected": history + [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"id": f"pair-{i}", "prompt": f"  Ünïcode → 数学: {a}+{b}? 🙂\n",
                         "chosen": f" \t{good} ✓ \n\n", "rejected": f"\n{bad} ✗  "})
    return rows


def bad_rows() -> list[dict]:
    """One row per kind of bad input, with the reason treg-score must report."""
    msg = lambda role, content: {"role": role, "content": content}  # noqa: E731
    return [
        {"id": "bad-missing", "prompt": "Hi", "chosen": "Hello"},
        {"id": "bad-null", "prompt": "Hi", "chosen": None, "rejected": "Bye"},
        {"id": "bad-empty", "prompt": "Hi", "chosen": "   ", "rejected": "Bye"},
        {"id": "bad-nonstring", "prompt": "Hi", "chosen": [msg("assistant", 42)], "rejected": "Bye"},
        {"id": "bad-last-turn", "chosen": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Hm")],
         "rejected": [msg("user", "Hi"), msg("assistant", "Bye")]},
        {"id": "bad-identical", "prompt": "Hi", "chosen": "Same answer.", "rejected": "Same answer."},
        {"id": "bad-too-long", "prompt": "Hi", "chosen": "word " * 400, "rejected": "Short."},
    ]


BAD_REASONS = {
    "bad-missing": "missing_field",
    "bad-null": "missing_field",
    "bad-empty": "empty_response",
    "bad-nonstring": "non_string_content",
    "bad-last-turn": "last_turn_not_assistant",
    "bad-identical": "identical_responses",
    "bad-too-long": "too_long",
}


def make_training_pair(prompt: int, chosen: int, rejected: int, id: str = "x"):
    """A TrainingPair of the given token counts, without reference log-probs."""
    import numpy as np

    from treg_train.index import TrainingPair

    ids = lambda n: np.arange(n, dtype=np.int32)  # noqa: E731
    return TrainingPair(id, ids(prompt), ids(chosen), ids(rejected), None, None, np.zeros(chosen), np.zeros(rejected))


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def make_learnable_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs a tiny model learns to rank within a few steps: the chosen answer is always a
    polite confirmation, the rejected one a curt refusal."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"id": f"learn-{i}", "prompt": f"Please add {a} and {b}.",
                     "chosen": f"Sure! The sum of {a} and {b} is {a + b}.", "rejected": "No."})
    return rows


def run(args, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def score_command(*args) -> list:
    """treg-score in this process's Python; without the reward check (tests/test_probe.py has it) unless asked."""
    asked = {"--reward-check", "auto"} & {str(a) for a in args}
    return [sys.executable, "-m", "treg_data.cli", *args, *([] if asked else ["--no-reward-check"])]


def probe_command(*args) -> list:
    return [sys.executable, "-m", "treg_data.probe_cli", *args]


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
                                max_length=256, max_prompt_length=128, batch_size=4, shard_size=8,
                                reward_check=False)
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


def perturbed_policy_logps(model, shards, pairs: int = 6, seed: int = 0, signal: tuple[str, str] | None = None):
    """(chosen, rejected) SideTokens of the first `pairs` pairs of `shards`: log-probs of `model` with its
    weights moved by seeded noise (so they differ from the stored reference's), through treg's kernel."""
    import torch
    from transformers import AutoModelForCausalLM

    from treg_core.forward import TokenLogprobs
    from treg_train.collate import collate, scatter_tokens
    from treg_train.index import Reading, ShardIndex
    from treg_train.losses import SideTokens
    from treg_train.readers import EvalReader

    reader = EvalReader(ShardIndex(str(shards), Reading(signal=signal)))
    batch = collate([reader.read(0, row) for row in range(pairs)], padding_free=False)
    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        logps = TokenLogprobs(network).eval()(batch.input_ids, batch.position_ids, batch.predict_index,
                                             batch.targets).logps
    logps = scatter_tokens(logps, batch.token_mask)
    return tuple(SideTokens(logps[rows], batch.ref_logps[rows], batch.rewards[rows], batch.token_mask[rows],
                            signal=None if batch.signal is None else batch.signal[rows])
                 for rows in (slice(0, pairs), slice(pairs, 2 * pairs)))


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


def checkpoint_layout(folder) -> tuple[dict, dict]:
    """What a loader reads from a HF checkpoint besides the values and the tokenizer: its config (less its path,
    version and dtype fields) and each tensor's name, shape and dtype. An export with the layout of its starting
    checkpoint (and that checkpoint's tokenizer, which the export copies) loads where that one did."""
    from safetensors import safe_open
    from transformers import AutoConfig

    ignored = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}
    config = {k: v for k, v in AutoConfig.from_pretrained(folder).to_dict().items() if k not in ignored}
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as tensors:
        layout = {name: (tensors.get_slice(name).get_shape(), tensors.get_slice(name).get_dtype())
                  for name in tensors.keys()}
    return config, layout


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
