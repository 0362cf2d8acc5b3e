"""treg-train's memory plan: printed without loading weights or data, close to the peak a run measures, and
the activation checkpointing --gradient-checkpointing auto picks from it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run, train_command

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines" / "bench"))


def llama_1b_shape(tmp_path: Path) -> Path:
    """A folder holding only the config of Llama-3.2-1B's shape (untied output layer, as the H200 run built it):
    the plan needs nothing else."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(tmp_path)
    return tmp_path


def test_plan_prints_a_table_and_a_json_line_without_weights_or_data(tmp_path):
    model = llama_1b_shape(tmp_path / "config-only")
    assert not list(model.glob("*.safetensors"))
    result = run(train_command("--plan", "--model", model, "--max-length", "2048", "--lora-r", "16"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    plan = json.loads(lines[-1])
    assert plan["peak_memory_gb"] == pytest.approx(sum(plan["parts"].values()), abs=0.01)
    for part in ("parameters", "gradients", "optimizer", "gathered layers", "activations", "log-prob chunk"):
        assert part in lines[0] + "".join(lines) and part in plan["parts"]
    assert plan["parts"]["optimizer"] < 0.1  # LoRA: the adapters' state only
    assert plan["parts"]["parameters"] == pytest.approx(1.498e9 * 4 / 2**30, rel=0.01)  # every weight, fp32


@pytest.mark.parametrize(("mode", "measured"), [("none", 51.80), ("every other layer", 39.63), ("every layer", 27.45)])
def test_the_plan_is_within_a_quarter_of_the_h200_peaks(mode, measured, tmp_path):
    """`pipelines/bench/gpu.py` on one H200: the 1B shape, bf16, batch 16 of pairs up to 2,048 tokens, treg-train's
    defaults (forwards of --micro-batch-tokens 16384, varlen attention over packs), three checkpointing settings."""
    from treg_train.model import decoder_layers, empty_causal_lm
    from treg_train.plan import Budget, ModelShape, plan

    lm = empty_causal_lm(str(llama_1b_shape(tmp_path)))
    planned = plan(ModelShape.of(lm, decoder_layers(lm)), Budget(1, torch.bfloat16, 16384, 1024, "cuda", mode))
    assert planned.peak_memory_gb == pytest.approx(measured, rel=0.25)


def test_the_h200_measurements_are_consistent_with_the_plan(tmp_path):
    """An earlier H200 run (padded batches, forwards of a whole global batch): 66.0 GB peak without checkpointing,
    28.0 GB with it on every layer, both runs on the same data. The token count of the largest forward was not
    recorded; taking the one at which the plan gives 66.0 GB without checkpointing, the plan for the other run
    must be within 25%."""
    from treg_train.model import decoder_layers, empty_causal_lm
    from treg_train.plan import Budget, ModelShape, plan

    lm = empty_causal_lm(str(llama_1b_shape(tmp_path)))
    shape = ModelShape.of(lm, decoder_layers(lm))

    def peak(tokens: int, mode: str) -> float:
        return plan(shape, Budget(1, torch.bfloat16, tokens, 1024, "cuda", mode)).peak_memory_gb

    tokens = next(t for t in range(1000, 65536, 100) if peak(t, "none") >= 66.0)
    assert 10_000 < tokens < 45_000  # a forward of the 32 sequences of a global batch, or part of it
    assert peak(tokens, "every layer") == pytest.approx(28.0, rel=0.25)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "small"])  # medium: pipelines/bench/memory_plan.py
def test_the_plan_is_within_a_quarter_of_the_measured_peak(size, tmp_path_factory):
    from memory_plan import VARIANTS, measure

    work = tmp_path_factory.getbasetemp() / "memory-plan"
    work.mkdir(exist_ok=True)
    for variant in VARIANTS:  # with and without checkpointing and LoRA
        planned, measured = measure(work, size, variant)
        assert planned == pytest.approx(measured, rel=0.25), (size, variant, planned, measured)


def test_auto_checkpoints_only_as_much_as_the_device_needs(tmp_path, monkeypatch):
    from tiny_model import build_tiny_model

    from treg_core.errors import UserError
    from treg_train import plan as plans
    from treg_train.config import TrainConfig

    tiny_model = str(build_tiny_model(tmp_path / "six-layers", num_layers=6))
    config = TrainConfig(model=tiny_model, micro_batch_tokens=65536, max_length=2048)
    monkeypatch.setattr(plans, "process_memory_gb", lambda: 0.25)  # not the test process's, which grows over a suite
    cpu = torch.device("cpu")
    full = {mode: plans.plan_run(TrainConfig(model=tiny_model, micro_batch_tokens=65536, max_length=2048,
                                             gradient_checkpointing=flag), 1, cpu, torch.float32)[0].peak_memory_gb
            for mode, flag in (("none", "false"), ("every other layer", "selective"), ("every layer", "true"))}
    assert full["none"] > full["every other layer"] > full["every layer"]
    for mode, peak in full.items():
        monkeypatch.setattr(plans, "device_memory_gb", lambda device, peak=peak: peak / 0.85 * 1.01)
        chosen, note = plans.plan_run(config, 1, cpu, torch.float32)
        assert chosen.checkpointing == mode and (note is None) == (mode == "none")
        if note:
            assert "activation checkpointing on" in note and "--gradient-checkpointing auto" in note
    monkeypatch.setattr(plans, "device_memory_gb", lambda device: full["every layer"] * 0.5)
    with pytest.raises(UserError, match=r"lower --micro-batch-tokens to \d+ \(now 65536\)") as refused:
        plans.plan_run(config, 1, cpu, torch.float32)
    assert "--lora-r" not in str(refused.value)  # the activations set the peak: LoRA would not lower it


@pytest.mark.slow
@pytest.mark.parametrize("model, expected", [
    ("missing", "model folder {tmp}/missing does not exist"),
    ("empty", "the folder has no config.json"),
    ("treg-tests/not-cached", "cannot load the config of --model 'treg-tests/not-cached'"),
])
def test_plan_on_a_model_it_cannot_read_is_one_line(model, expected, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(train_command("--plan", "--model", model if "/" in model else tmp_path / model), timeout=300)
    assert_one_line_error(result, expected.format(tmp=tmp_path))
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _not_fitting(monkeypatch, model: Path, gb: float, device: str = "cuda", world_size: int = 1, **settings) -> str:
    """The line --plan prints for these settings on a device of `gb` GB, where nothing fits."""
    from treg_train import plan as plans
    from treg_train.config import TrainConfig

    monkeypatch.setattr(plans, "device_memory_gb", lambda device: gb)
    monkeypatch.setattr(plans, "process_memory_gb", lambda: 0.25)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    memory, note = plans.plan_run(TrainConfig(model=str(model), **settings), world_size, torch.device(device), dtype,
                                  strict=False)
    assert note and "the run needs" in note and " on none" not in note, note
    return note


def test_a_cpu_load_peak_is_advised_on_as_such(tmp_path, monkeypatch):
    """Rank 0's full copy of the checkpoint sets the peak: LoRA (already on) and more processes (8) do not lower it."""
    note = _not_fitting(monkeypatch, llama_1b_shape(tmp_path), 10.0, "cpu", 8, lora_r=16)
    assert "full fp32 copy of the checkpoint" in note and "more memory" in note
    for wrong in ("(--lora-r 16)", "processes (now", "lower --micro-batch-tokens to"):
        assert wrong not in note, note


def test_the_advice_never_offers_what_is_set(tmp_path, monkeypatch):
    """LoRA and processes are offered where they would help, and not once LoRA is on and there are as many processes
    as pairs in a global batch (each forward then holds one pair already)."""
    model = llama_1b_shape(tmp_path)
    note = _not_fitting(monkeypatch, model, 20.0)
    assert "train LoRA adapters (--lora-r 16)" in note and "run 4 processes (now 1)" in note, note
    note = _not_fitting(monkeypatch, model, 5.0, world_size=8, lora_r=16, global_batch_size=8)
    assert "--lora-r" not in note and "processes" not in note and "--micro-batch-tokens" not in note, note
    assert "no setting lowers it" in note, note


def test_a_checkpointing_mode_given_is_the_one_planned(tmp_path, monkeypatch):
    """--gradient-checkpointing false: the plan shown is without checkpointing, and turning it on is advised."""
    model = llama_1b_shape(tmp_path)
    note = _not_fitting(monkeypatch, model, 10.0, gradient_checkpointing="false", max_length=8192,
                        micro_batch_tokens=16384)
    assert "without activation checkpointing" in note and "--gradient-checkpointing true (now false) gives" in note
    result = run(train_command("--plan", "--model", model, "--gradient-checkpointing", "false", "--micro-batch-tokens",
                               "4000000", "--max-length", "2048"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1])["checkpointing"] == "none"
    assert "needs" in result.stdout and "without activation checkpointing" in result.stdout, result.stdout


def test_every_run_prints_its_plan_first(tiny_model, learnable_shards, tmp_path):
    result = subprocess.run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "r",
                                          "--global-batch-size", "8", "--max-steps", "1", "--save-steps", "0"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    plan_line = next(line for line in result.stderr.splitlines() if "memory plan:" in line)
    assert "GB per device" in plan_line and "checkpointing: none" in plan_line


def test_tdpo_s_kl_is_planned_from_the_reference_in_memory_and_from_the_shards_top_k(tmp_path):
    """TDPO's KL widens the log-prob chunk: by the reference's logits and log-probs beside the policy's with
    --ref-model, by the policy's log-probs outside the top K without one (the shards' top-K); a reference is planned
    only where one is held."""
    from treg_train.plan import Planner

    model, planner = str(llama_1b_shape(tmp_path / "config-only")), Planner("cuda", torch.bfloat16, 0.0)

    def parts(**settings) -> dict:
        from treg_train.config import TrainConfig

        return planner.plans(TrainConfig(model=model, **settings), 1)["none"].parts

    dpo, top_k, exact = parts(loss="dpo"), parts(loss="tdpo2"), parts(loss="tdpo2", ref_model=model)
    block = 1024 * 128256 / 2**30  # GiB per byte of one chunk's [rows, vocabulary] entries
    assert top_k["log-prob chunk"] - dpo["log-prob chunk"] == pytest.approx(4 * block)
    assert exact["log-prob chunk"] - dpo["log-prob chunk"] == pytest.approx(8 * block)
    assert top_k["reference model"] == 0 < exact["reference model"]
