"""The recipes, launch scripts and the quickstart."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from treg_data.cli import command as score_command
from treg_train.config import build_config
from treg_train.objectives import METHODS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "pipelines" / "recipes").glob("*/*.yaml"))
SCORE_RECIPES = [p for p in RECIPES if p.stem == "score" or p.stem.startswith("score_")]  # e.g. score_dpo_reward
PROBE_RECIPES = [p for p in RECIPES if p.stem == "probe"]
TRAIN_RECIPES = [p for p in RECIPES if p not in SCORE_RECIPES + PROBE_RECIPES]


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_training_recipes_load_and_validate(path):
    config = build_config(str(path), {"output": "runs/x"})
    settings = config.loss_settings()
    if config.loss == "cdpo":  # its authors' LoRA recipe on GSM8K, not the paper's grid
        assert (settings.beta, config.learning_rate, config.lora_r, config.num_train_epochs) == (0.1, 4e-5, 16, 3)
        return
    assert config.global_batch_size == 128 and config.max_length == 2048
    assert config.warmup_ratio == (0.03 if config.loss == "sepo" else 0.1)
    authors = {"d2po": (0.1, 0.0), "confpo": (1.5, 1.6), "tgdpo": (0.1, 0.0), "tis_dpo": (0.1, 0.0), "sepo": (1.0, 0.0),
               "tdpo2": (0.1, 0.0), "otpo": (0.01, 0.0)}
    if config.loss in authors:  # the methods' authors' published settings, the loss's own weighting
        assert (settings.beta, settings.gamma, settings.weighting) == (*authors[config.loss],
                                                                       METHODS[config.loss].weighting)
        assert config.loss != "tdpo2" or (settings.tdpo_alpha, config.ref_model) == (0.5, config.model)
    elif config.swap_pairs:  # TIS-DPO's reverse-DPO model
        assert (config.loss, settings.beta) == ("dpo", 0.1)
    elif config.loss.startswith("simpo"):
        assert settings.beta == 10.0 and settings.gamma / settings.beta in (0.3, 0.5)
    else:
        assert settings.beta == 0.01 and 5e-7 <= config.learning_rate <= 1e-6


def test_recipes_cover_the_paper_grid():
    for model in ("llama3-8b-instruct", "gemma2-9b-it"):
        names = {p.stem for p in TRAIN_RECIPES if p.parent.name == model}
        assert {"dpo", "dpo_reg", "simpo", "simpo_reg"} <= names
        alphas = sorted(build_config(str(p), {"output": "x"}).alpha for p in TRAIN_RECIPES
                        if p.parent.name == model and p.stem.startswith("dpo_reg"))
        assert alphas == [0.1, 0.25, 0.5]


def test_score_recipes_use_real_treg_score_flags():
    known = {opt for param in score_command.params for opt in param.opts}
    for path in SCORE_RECIPES:
        for key in yaml.safe_load(path.read_text()):
            assert f"--{key}" in known, (path, key)


@pytest.mark.parametrize("path", SCORE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_score_recipes_are_treg_score_configs(path):
    from treg_core.command_line import load_settings
    from treg_data.config import ScoreConfig, validate

    recipe = yaml.safe_load(path.read_text())
    config = validate(load_settings(ScoreConfig, str(path), {"worker_index": 3, "num_workers": 16}))
    assert (config.model, config.dataset, config.output) == (recipe["model"], recipe["dataset"], recipe["output"])
    assert config.max_length == recipe["max-length"] and (config.worker_index, config.num_workers) == (3, 16)
    flagged = load_settings(ScoreConfig, str(path), {"max_length": 512})
    assert flagged.max_length == 512  # a flag overrides the recipe


@pytest.mark.parametrize("path", PROBE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_probe_recipes_are_treg_probe_configs(path):
    from treg_core.command_line import load_settings
    from treg_data.probe_cli import ProbeConfig

    config = load_settings(ProbeConfig, str(path), {})
    assert config.model == yaml.safe_load(path.read_text())["model"] and config.backend in ("vllm", "hf")


def _fake(bin_dir: Path, name: str) -> None:
    script = bin_dir / name
    script.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$0" "$@"\n')
    script.chmod(0o755)


def test_launch_scripts_build_the_right_commands(tmp_path):
    _fake(tmp_path, "treg-score")
    _fake(tmp_path, "torchrun")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_COUNT": "16",
           "SLURM_ARRAY_TASK_ID": "3"}
    recipe = ROOT / "pipelines/recipes/llama3-8b-instruct/score.yaml"
    out = subprocess.run(["bash", ROOT / "pipelines/launch/score_slurm_array.sh", recipe, "--overwrite"],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out[1:3] == ["--config", str(recipe)]  # treg-score reads the recipe itself
    assert out[-5:] == ["--num-workers", "16", "--worker-index", "3", "--overwrite"]
    train = ROOT / "pipelines/recipes/llama3-8b-instruct/dpo_reg.yaml"
    out = subprocess.run(["bash", ROOT / "pipelines/launch/train_1node.sh", train, str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out[1:] == ["--standalone", "--nproc-per-node", "8", "-m", "treg_train", "--config", str(train),
                       "--output", str(tmp_path / "run")]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    out = subprocess.run(["bash", ROOT / "pipelines/launch/train_1node.sh", train, str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out[-1] == "--resume"


def test_the_multinode_script_requeues_a_run_that_stopped_for_a_signal(tmp_path):
    """Slurm's part faked (srun runs its command; scontrol names the head node and records a requeue): the script
    hands torchrun the rendezvous, makes its agent ignore SIGUSR1, and requeues only when the run wrote stopped.json
    (torchrun exits 1 either way)."""
    (tmp_path / "torchrun").write_text('#!/usr/bin/env bash\ntrap -p USR1 > "$FAKE/trap"; printf "%s\\n" "$@" > '
                                       '"$FAKE/args"\n[ -n "${STOP:-}" ] && echo {} > "$OUT/stopped.json"; exit 1\n')
    (tmp_path / "srun").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    (tmp_path / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1" = requeue ] && echo "$2" > "$FAKE/requeued"\n'
                                       'echo node-a\n')
    for name in ("torchrun", "srun", "scontrol"):
        (tmp_path / name).chmod(0o755)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "stopped.json").write_text("{}")  # an earlier stop's: removed before the run starts
    train = ROOT / "pipelines/recipes/llama3-8b-instruct/dpo_reg.yaml"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path), "OUT": str(out),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}
    script = ["bash", ROOT / "pipelines/launch/train_multinode.sbatch", train, out]
    failed = subprocess.run(script, capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and not (tmp_path / "requeued").exists() and not (out / "stopped.json").exists()
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:4] == ["--nnodes", "2", "--nproc-per-node", "8"] and "node-a:29500" in args and args[-1] == "--resume"
    assert "USR1" in (tmp_path / "trap").read_text()  # the agent ignores it; the ranks take it
    stopped = subprocess.run(script, capture_output=True, text=True, env={**env, "STOP": "1"})
    assert stopped.returncode == 1 and (tmp_path / "requeued").read_text().strip() == "77"


def test_shipped_quickstart_pairs_are_valid_and_varied():
    from treg_data.pairs import Columns, parse_pair

    rows = [json.loads(line) for line in (ROOT / "pipelines/data/quickstart-pairs.jsonl").read_text().splitlines()]
    assert len(rows) >= 300
    pairs = [parse_pair(row, Columns()) for row in rows]
    assert len({p.id for p in pairs}) == len(rows)
    assert {len(p.prompt) for p in pairs} == {1, 2, 3}  # plain, system + user, and multi-turn prompts


@pytest.mark.engine
def test_quickstart_runs_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "pipelines/quickstart.py"), "--output", str(tmp_path / "qs"),
                             "--cache", str(tmp_path / "cache"), "--epochs", "1", "--build-steps", "30"],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "=== [4/4]" in out and "quickstart finished" in out and "pairs            320 scored" in out
    assert "token rewards    mean Σ r̂" in out and "on its first wrong token in" in out
    assert "reward check     AUROC" in out and "reward check: AUROC" in result.stderr  # the probe line, then summed up
    assert (tmp_path / "cache" / "quickstart-model-v3-30-steps" / "config.json").exists()  # built once, then cached
    for path in ("scored/manifest.json", "train/final/model.safetensors", "train/metrics.jsonl", "report.html"):
        assert (tmp_path / "qs" / path).exists(), path
    metrics = [json.loads(line) for line in (tmp_path / "qs/train/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (tmp_path / "qs/report.html").read_text().count('class="pair"') == 8
    curves = (tmp_path / "qs/curves.html").read_text()
    assert f"curves           {tmp_path / 'qs/curves.html'}" in out
    loss = curves.split('data-series="loss"')[1].split("</g>")[0]
    assert loss.count('class="point"') == len(metrics)


def test_the_quickstart_builds_with_the_loss_of_its_rows_run_whole(tiny_model, tokenizer):
    """The build runs the start its rows share once (quickstart_model.answer_loss): the same loss and gradients as
    each row run whole, padded, with labels on the answers only."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "pipelines"))
    import quickstart_model

    rows = quickstart_model.examples(tokenizer)["worse"]
    rows = random.Random(0).sample(rows, 6)
    shared = os.path.commonprefix([prefix for prefix, _ in rows])
    assert 0 < len(shared) < min(len(prefix) for prefix, _ in rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)

    def whole() -> torch.Tensor:
        input_ids, labels, attention = quickstart_model.answer_batch(rows, tokenizer.pad_token_id)
        logits = model(input_ids=input_ids, attention_mask=attention).logits  # float64 (the HF loss is float32)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    losses, grads = [], []
    for compute in (lambda: quickstart_model.answer_loss(model, rows, shared, tokenizer.pad_token_id), whole):
        model.zero_grad()
        loss = compute()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 * grads[1].abs().max()
