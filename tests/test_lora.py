"""treg-train --lora-r for real: torchrun with 2 processes on CPU (gloo, FSDP2) on the tiny model; only the
adapters learn, the policy starts exactly at the checkpoint, the merged export loads in transformers and
has the starting model's layout, the adapter alone loads in peft, and a killed run resumes to the same losses."""

import json
import math

import pytest
import torch
from helpers import (
    assert_one_line_error,
    kill_after_first_checkpoint_and_resume,
    read_metrics,
    run,
    train_command,
)

# LoRA's update starts at zero (B = 0), so it wants a larger learning rate than full fine-tuning.
ARGS = ["--global-batch-size", "8", "--max-steps", "12", "--learning-rate", "2e-3", "--beta", "0.1",
        "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3",
        "--lora-r", "8", "--export-adapter"]


def _command(model, data, output, *extra, processes=2):
    return train_command("--model", model, "--data", data, "--output", output, *ARGS, *extra, processes=processes)


@pytest.fixture(scope="module")
def lora_run(tiny_model, learnable_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora") / "run"
    result = run(_command(tiny_model, learnable_shards, output, "--loss", "dpo_reg", "--save-steps", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA r=8" in result.stderr and "trainable parameters" in result.stderr
    return output


@pytest.mark.slow
def test_only_the_adapters_learn_and_the_loss_falls(tiny_model, lora_run):
    from transformers import AutoModelForCausalLM

    metrics = read_metrics(lora_run)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["loss"] < 0.7 * metrics[0]["loss"]
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final").state_dict()
    assert merged.keys() == start.keys()  # the plain architecture: no LoRA names left in the merged model
    targeted = json.loads((lora_run / "final-adapter" / "adapter_config.json").read_text())["target_modules"]
    assert len(targeted) == 14  # all-linear: q, k, v, o, gate, up, down of both layers; not the output layer
    for name, weight in start.items():
        if name.removesuffix(".weight") in targeted:
            assert not torch.equal(merged[name], weight), name
        else:
            assert torch.equal(merged[name], weight), name  # bit for bit: embeddings, norms, output layer


def test_one_process_matches_two(tiny_model, learnable_shards, lora_run, tmp_path):
    """The adapters' first values are drawn whole on rank 0 and scattered: the same for any number of processes."""
    result = run(_command(tiny_model, learnable_shards, tmp_path / "one", "--loss", "dpo_reg", "--save-steps", "0",
                          processes=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es)" in result.stderr
    for a, b in zip(read_metrics(lora_run), read_metrics(tmp_path / "one"), strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_the_adapter_alone_loads_in_peft_and_equals_the_merged_model(tiny_model, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = lora_run / "final-adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final")
    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 12, 40, 77]])
    with torch.no_grad():
        a, b, c = with_adapter(ids).logits, merged(ids).logits, start(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert (b - c).abs().max() > 1e-3


@pytest.mark.slow
def test_the_policy_starts_at_the_checkpoint_so_the_first_dpo_loss_is_ln2(tiny_model, learnable_shards, tmp_path):
    """B = 0 and the base weights are the checkpoint's on both ranks; step 1 logs the loss before its update."""
    output = tmp_path / "init"
    result = run(_command(tiny_model, learnable_shards, output, "--loss", "dpo", "--max-steps", "1",
                          "--save-steps", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    first = read_metrics(output)[0]
    assert first["step"] == 1 and first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_losses(tiny_model, learnable_shards, lora_run, tmp_path):
    import torch.distributed.checkpoint as dcp

    output = tmp_path / "killed"
    resumed = kill_after_first_checkpoint_and_resume(
        _command(tiny_model, learnable_shards, output, "--loss", "dpo_reg", "--save-steps", "4"), output)
    uninterrupted = read_metrics(lora_run)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]
    # The checkpoints hold the adapters (and their optimizer state), not the frozen base weights.
    saved = dcp.FileSystemReader(str(output / "checkpoints" / "step-00000004")).read_metadata().state_dict_metadata
    weights = [key for key in saved if key.startswith("model.")]
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)


def test_the_merged_export_has_the_layout_of_the_starting_model(tiny_model, lora_run):
    """Merged into plain weights: what loads the starting model (vLLM, transformers) loads the export."""
    from helpers import checkpoint_layout

    assert checkpoint_layout(lora_run / "final") == checkpoint_layout(tiny_model)
    assert not (lora_run / "final" / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-r", "-1"], "--lora-r -1: it must be an integer >= 0"),
        (["--lora-alpha", "0"], "--lora-alpha 0.0: it must be a positive number"),
        (["--lora-dropout", "1"], "--lora-dropout 1.0: it must be in [0, 1)"),
        (["--lora-r", "0"], "--export-adapter needs --lora-r above 0"),
        (["--lora-target-modules", "no_such_proj"], "--lora-target-modules 'no_such_proj'"),
        (["--lora-target-modules", "embed_tokens"], "not linear"),
    ],
)
def test_bad_lora_settings_give_one_clear_message(tiny_model, learnable_shards, tmp_path, extra, message):
    command = train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "out", *ARGS,
                            *extra)
    assert_one_line_error(run(command), message)


def test_resume_refuses_other_lora_settings():
    from treg_train.config import TrainConfig, changed_on_resume

    saved = TrainConfig(model="m", data="d", output="o", lora_r=8).as_dict()
    now = TrainConfig(model="m", data="d", output="o", lora_r=16, lora_target_modules="q_proj", resume=True)
    assert changed_on_resume(saved, now) == ["--lora-r 8 (now 16)", "--lora-target-modules 'all-linear' (now 'q_proj')"]
