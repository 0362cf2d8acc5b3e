"""--sharding: with 2 processes over gloo, shard_grad_op and no_shard train the same steps as full_shard (losses and
gradient norms), a checkpoint written under one sharding resumes under another (and on one process), and the memory
plan counts what each holds and picks the sharding --sharding auto runs."""

import shutil

import pytest
import torch
from helpers import assert_one_line_error, read_metrics, run, train_command

ARGS = ["--global-batch-size", "8", "--max-steps", "3", "--save-steps", "2", "--learning-rate", "2e-4", "--beta",
        "0.1", "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3"]
MODES = ("full_shard", "shard_grad_op", "no_shard")


def _train(model, data, output, *extra, processes=2):
    return run(train_command("--model", model, "--data", data, "--output", output, *ARGS, *extra,
                             processes=processes), timeout=600)


@pytest.fixture(scope="module")
def runs(tiny_model, learnable_shards, tmp_path_factory):
    """A run of 3 steps on 2 processes under each sharding, each with a checkpoint at step 2."""
    root, outputs = tmp_path_factory.mktemp("sharding"), {}
    for mode in MODES:
        outputs[mode] = root / mode
        result = _train(tiny_model, learnable_shards, outputs[mode], "--sharding", mode)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"sharding: {mode};" in result.stderr  # the plan line says which it runs
    return outputs


def _assert_same_steps(run: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in run] == [m["step"] for m in reference] == [1, 2, 3]
    for a, b in zip(reference, run, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["shard_grad_op", "no_shard"])
def test_each_sharding_trains_the_steps_full_shard_trains(runs, mode):
    _assert_same_steps(read_metrics(runs[mode]), read_metrics(runs["full_shard"]))
    assert (runs[mode] / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("written_under, resumed_under, processes", [("full_shard", "no_shard", 2),
                                                                      ("no_shard", "shard_grad_op", 1)])
def test_a_checkpoint_resumes_under_another_sharding(tiny_model, learnable_shards, runs, tmp_path, written_under,
                                                     resumed_under, processes):
    stopped = tmp_path / "stopped"  # the run as if killed after its checkpoint at step 2
    shutil.copytree(runs[written_under], stopped)
    shutil.rmtree(stopped / "final")
    (stopped / "finished.json").unlink()
    result = _train(tiny_model, learnable_shards, stopped, "--resume", "--sharding", resumed_under,
                    processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    # Step 3 needs the weights and Adam's moments of step 2, resharded from the other sharding's checkpoint.
    _assert_same_steps(read_metrics(stopped), read_metrics(runs[written_under]))


def test_an_unknown_sharding_is_refused_with_the_choices(tmp_path):
    result = run(train_command("--plan", "--model", tmp_path, "--sharding", "ddp"), timeout=300)
    assert_one_line_error(result, "--sharding must be one of auto, full_shard, shard_grad_op, no_shard, got 'ddp'")


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> str:
    """A folder holding only a model's config (the plan needs nothing else): six layers, so that shard_grad_op's
    gathered layers outnumber full_shard's two."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("six-layers")
    LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=2048).save_pretrained(folder)
    return str(folder)


def _plans(model: str, world_size: int = 2, device: str = "cpu", **settings) -> dict:
    from treg_train.config import TrainConfig
    from treg_train.plan import Planner

    planner = Planner(device, torch.float32, 0.25)
    config = TrainConfig(model=model, **settings)
    return {mode: planner.plans(config, world_size, mode)["none"] for mode in MODES}


def test_the_plan_counts_what_each_sharding_holds(six_layers):
    plans = _plans(six_layers)
    full, grad_op, whole = (plans[mode].parts for mode in MODES)
    for part in ("parameters", "gradients", "optimizer"):  # split over 2 processes, but whole under no_shard
        assert grad_op[part] == pytest.approx(full[part]) and whole[part] == pytest.approx(2 * full[part]), part
    assert whole["gathered layers"] == pytest.approx(full["gathered layers"])  # FSDP2 copies a layer as it computes
    assert grad_op["gathered layers"] > full["gathered layers"]  # every layer kept from forward to backward
    for part in ("activations", "log-prob chunk"):
        assert whole[part] == full[part] == grad_op[part], part
    assert [plans[mode].sharding for mode in MODES] == list(MODES)
    assert "sharding: no_shard;" in plans["no_shard"].line() and '"sharding": "no_shard"' in plans["no_shard"].json()


@pytest.mark.parametrize("room, expected", [("no_shard", "shard_grad_op"), ("shard_grad_op", "shard_grad_op"),
                                            ("full_shard", "full_shard")])
def test_auto_shards_only_as_far_as_the_device_needs(six_layers, monkeypatch, room, expected):
    """On a CPU, auto runs shard_grad_op where its plan fits, else full_shard (before checkpointing activations),
    never no_shard, which was slower over gloo; on GPUs full_shard; on one process nothing is sharded."""
    from treg_train import plan as plans
    from treg_train.config import TrainConfig

    peaks = {mode: plan.peak_memory_gb for mode, plan in _plans(six_layers).items()}
    assert peaks["no_shard"] > peaks["shard_grad_op"] > peaks["full_shard"]
    monkeypatch.setattr(plans, "process_memory_gb", lambda: 0.25)
    monkeypatch.setattr(plans, "device_memory_gb", lambda device: peaks[room] / plans.FIT_SHARE * 1.001)
    config = TrainConfig(model=six_layers, gradient_checkpointing="false")
    chosen, note = plans.plan_run(config, 2, torch.device("cpu"), torch.float32)
    assert (chosen.sharding, chosen.checkpointing) == (expected, "none"), note
    assert plans.shardings(config, 2, "cuda") == ("full_shard",)
    assert plans.plan_run(config, 1, torch.device("cpu"), torch.float32)[0].sharding == plans.ONE_PROCESS


def test_the_sharding_is_changeable_on_resume():
    from treg_train.config import TrainConfig, changed_on_resume

    saved = TrainConfig(model="m", data="d", output="o", sharding="full_shard").record()
    assert changed_on_resume(saved, TrainConfig(model="m", data="d", output="o", sharding="no_shard")) == []


def test_a_sharding_that_does_not_fit_is_advised_against(six_layers, monkeypatch):
    from treg_train import plan as plans
    from treg_train.config import TrainConfig

    config = TrainConfig(model=six_layers, gradient_checkpointing="true", sharding="no_shard")
    least = plans.Planner("cpu", torch.float32, 0.25).plans(config, 2, "full_shard")["every layer"].peak_memory_gb
    monkeypatch.setattr(plans, "process_memory_gb", lambda: 0.25)
    monkeypatch.setattr(plans, "device_memory_gb", lambda device: least / plans.FIT_SHARE * 1.001)
    memory, note = plans.plan_run(config, 2, torch.device("cpu"), torch.float32, strict=False)
    assert memory.sharding == "no_shard" and "--sharding full_shard (now no_shard)" in note, note
