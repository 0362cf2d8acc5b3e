"""treg-train for real: torchrun with 2 processes on CPU (gloo, FSDP2), on shards written by
treg-score; then the exported model in transformers and in the vLLM engine."""

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_after_first_checkpoint_and_resume, read_metrics, run, score_command, train_command

ARGS = ["--global-batch-size", "8", "--max-steps", "12", "--learning-rate", "2e-4", "--beta", "0.1",
        "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3"]


def _train(model, data, output, *extra, processes=1):
    return run(train_command("--model", model, "--data", data, "--output", output, *ARGS, *extra, processes=processes))


@pytest.fixture(scope="module")
def single(tiny_model, learnable_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("train") / "single"
    result = _train(tiny_model, learnable_shards, output, "--save-steps", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


@pytest.fixture(scope="module")
def short_run(tiny_model, learnable_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("train") / "short"
    result = _train(tiny_model, learnable_shards, output, "--save-steps", "0", "--max-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.slow
def test_loss_falls_and_reward_accuracy_rises(single):
    output, result = single
    metrics = read_metrics(output)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    first, last = metrics[:3], metrics[-3:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < 0.7 * mean(first, "loss")
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert mean(last, "rewards/margins") > 0
    for key in ("dpo_loss", "reg_loss", "mean_w", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected", "token_reward_agreement", "grad_norm", "learning_rate",
                "tokens_per_second_per_device", "peak_memory_gb"):
        assert key in metrics[-1]
    assert "treg-train finished: 12 steps" in result.stdout


@pytest.mark.slow
def test_two_processes_match_one(tiny_model, learnable_shards, single, tmp_path):
    result = _train(tiny_model, learnable_shards, tmp_path / "two", "--save-steps", "0", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_metrics(single[0]), read_metrics(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def _kill_after_first_checkpoint_and_resume(model, data, output, *extra):
    """A 2-process run killed once step 4 is saved, then resumed."""
    command = train_command("--model", model, "--data", data, "--output", output, *ARGS, "--save-steps", "4", *extra,
                            processes=2)
    return kill_after_first_checkpoint_and_resume(command, output)


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_losses(tiny_model, learnable_shards, single, tmp_path):
    resumed = _kill_after_first_checkpoint_and_resume(tiny_model, learnable_shards, tmp_path / "killed")
    uninterrupted = read_metrics(single[0])
    assert [m["step"] for m in resumed] == list(range(1, 13))
    for a, b in zip(uninterrupted, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]


@pytest.mark.slow
def test_accelerate_launch_runs_two_processes_like_torchrun(tiny_model, learnable_shards, single, tmp_path):
    output = tmp_path / "accelerate"
    with socket.socket() as s:  # a free port, as torchrun --standalone finds one
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", port,
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "treg_train", "--model", tiny_model,
               "--data", learnable_shards, "--output", str(output), *ARGS, "--save-steps", "0"]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "treg-train: 2 process(es) on cpu" in result.stderr
    for a, b in zip(read_metrics(single[0]), read_metrics(output), strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def bf16_run(tiny_model, learnable_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("train") / "bf16"
    result = _train(tiny_model, learnable_shards, output, "--save-steps", "0", "--dtype", "bfloat16", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


@pytest.mark.slow
def test_bf16_mixed_precision_learns_and_warns_about_fp32_shards(bf16_run, single):
    output, result = bf16_run
    assert "computing in bfloat16" in result.stderr
    assert "warning: the reference log-probs" in result.stderr and "scored in float32" in result.stderr
    bf16, fp32 = read_metrics(output), read_metrics(single[0])
    assert np.mean([m["loss"] for m in bf16[-3:]]) < 0.7 * np.mean([m["loss"] for m in bf16[:3]])
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=5e-3)  # the same objective, in lower precision
    assert any(abs(a["loss"] - b["loss"]) > 1e-7 for a, b in zip(bf16, fp32))  # and it did compute in bf16
    # The export keeps the starting checkpoint's dtype (fp32 here), from the fp32 master weights.
    assert json.loads((output / "final" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.slow
def test_bf16_kill_and_resume_reproduces_the_losses(tiny_model, learnable_shards, bf16_run, tmp_path):
    resumed = _kill_after_first_checkpoint_and_resume(tiny_model, learnable_shards, tmp_path / "killed",
                                                      "--dtype", "bfloat16")
    for a, b in zip(read_metrics(bf16_run[0]), resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]


@pytest.mark.slow
def test_rank0_loading_equals_the_checkpoint_for_untied_and_tied_embeddings(tiny_model, tmp_path):
    """Rank 0 reads, the other rank receives its shards: the result is the checkpoint exactly."""
    from families import build_family_model

    for model in (tiny_model, build_family_model("gemma2", tmp_path / "gemma2")):
        result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      Path(__file__).parent / "distributed" / "check_loading.py", model], timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report == {"same_keys": True, "max_param_diff": 0.0, "same_buffer_names": True, "max_buffer_diff": 0.0,
                          "tied": report["reference_tied"], "reference_tied": report["reference_tied"]}
        assert report["tied"] == (model != tiny_model)


def test_exported_model_loads_in_transformers_and_differs_from_the_start(tiny_model, single):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = single[0] / "final"
    trained = AutoModelForCausalLM.from_pretrained(final)
    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert AutoTokenizer.from_pretrained(final).chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), start.state_dict().values())]
    assert max(diffs) > 1e-4
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.isfinite(trained(ids).logits).all()


@pytest.mark.engine
def test_exported_model_scores_in_vllm(single, tmp_path):
    from helpers import make_learnable_pairs, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", make_learnable_pairs(4))
    result = run(score_command("--model", single[0] / "final", "--dataset", data, "--output", tmp_path / "scored",
                               "--dtype", "float32", "--max-length", "256", "--max-prompt-length", "128",
                               "--enforce-eager"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairs scored   4" in result.stdout and "vllm:cached_prefix_rows" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "ipo"], "--loss must be one of"),
        (["--global-batch-size", "0"], "--global-batch-size 0: it must be at least 1"),
        (["--learning-rate", "abc"], "'abc' is not a valid float"),
        (["--no-such-flag"], "No such option"),
        (["--max-length", "4096"], "--micro-batch-tokens must hold one pair"),
    ],
)
def test_bad_flags_give_one_clear_message(tiny_model, learnable_shards, tmp_path, extra, message):
    result = _train(tiny_model, learnable_shards, tmp_path / "out", *extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_config_file_with_flags_on_top(tiny_model, learnable_shards, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model}\ndata: {learnable_shards}\n"
                      "loss: simpo_reg\nlearning-rate: 1.0e-4\nbogus: 1\n")
    result = run(train_command("--config", config, "--output", tmp_path / "o"), timeout=300)
    assert result.returncode == 2 and "unknown setting(s) ['bogus']" in result.stderr
    config.write_text(config.read_text().replace("bogus: 1\n", ""))
    result = run(train_command("--config", config, "--output", tmp_path / "o", "--global-batch-size", "8",
                               "--max-steps", "2", "--max-length", "256", "--micro-batch-tokens", "1024",
                               "--save-steps", "0"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_metrics(tmp_path / "o")) == 1  # logging every 10 steps, plus the last one


def test_shards_of_another_tokenizer_are_refused(learnable_shards, tmp_path):
    from tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other-model", vocab_size=600)
    result = _train(str(other), learnable_shards, tmp_path / "out")
    assert result.returncode == 2 and "another tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_bad_shards_give_one_clear_message(tiny_model, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.parquet").write_bytes(b"not parquet at all")
    result = _train(tiny_model, str(tmp_path), tmp_path / "out")
    assert result.returncode == 2 and "broken.parquet" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--gradient-checkpointing", "true"], ["--gradient-checkpointing", "selective"],
                                   ["--padding-free"], ["--attn-implementation", "varlen"], ["--compile"],
                                   ["--compile", "--gradient-checkpointing", "true"], ["--ref-model", "MODEL"]],
                         ids=["gradient-checkpointing", "selective-checkpointing", "packed", "packed-varlen", "compile",
                              "compile-checkpointing", "online-reference"])
def test_memory_and_reference_options_leave_the_losses_unchanged(tiny_model, learnable_shards, short_run, tmp_path,
                                                                 extra):
    extra = [tiny_model if arg == "MODEL" else arg for arg in extra]
    result = _train(tiny_model, learnable_shards, tmp_path / "variant", "--save-steps", "0", "--max-steps", "3", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(read_metrics(short_run), read_metrics(tmp_path / "variant"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
