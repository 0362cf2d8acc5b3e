"""Evaluation on held-out pairs (--eval-data, --eval-fraction, --eval-steps): the eval/ metrics of a
2-process run are those of one plain forward over the whole set on the exported weights, evaluating
changes nothing in the training, and --eval-fraction splits the pairs by their place in the shards."""

from dataclasses import replace

import pytest
import torch
from helpers import (
    assert_one_line_error,
    hf_score_config,
    make_learnable_pairs,
    read_metrics,
    run,
    train_command,
    write_jsonl,
)

from treg_data import pipeline
from treg_train.config import TrainConfig, changed_on_resume
from treg_train.index import ShardIndex
from treg_train.readers import EvalReader, TrainingStream

ARGS = ["--global-batch-size", "8", "--max-steps", "12", "--learning-rate", "2e-4", "--beta", "0.1",
        "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "1024", "--seed", "3"]
TRAINING = ("loss", "dpo_loss", "reg_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "grad_norm")


def _train(model, data, output, *extra, processes=2):
    return run(train_command("--model", model, "--data", data, "--output", output, *ARGS, *extra,
                             processes=processes))


def _training_lines(output) -> list[dict]:
    return [row for row in read_metrics(output) if "loss" in row]


@pytest.fixture(scope="module")
def eval_shards(tiny_model, tmp_path_factory):
    """17 pairs the training data does not hold, scored like it: chunks of 8, 8 and 1 pairs, so in the last
    one a rank has no pair of its own and runs a dummy."""
    root = tmp_path_factory.mktemp("eval")
    data = write_jsonl(root / "pairs.jsonl", make_learnable_pairs(17, seed=1))
    pipeline.run(hf_score_config(tiny_model, data, root / "scored"))
    return str(root / "scored")


@pytest.fixture(scope="module")
def evaluated(tiny_model, learnable_shards, eval_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("train") / "evaluated"
    result = _train(tiny_model, learnable_shards, output, "--eval-data", eval_shards, "--eval-steps", "4",
                    "--save-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


@pytest.mark.slow
def test_eval_metrics_equal_one_process_on_the_exported_model(evaluated, eval_shards):
    from transformers import AutoModelForCausalLM

    from treg_core.forward import TokenLogprobs
    from treg_train.collate import collate, scatter_tokens
    from treg_train.losses import SideTokens, preference_loss

    output, result = evaluated
    evals = [row for row in read_metrics(output) if "eval/loss" in row]
    assert [row["step"] for row in evals] == [4, 8, 12]  # every 4 steps, the last one included once
    assert not any(key.startswith("eval/") for row in _training_lines(output) for key in row)
    assert "eval_loss=" in result.stderr  # in the progress bar
    for key in ("eval/dpo_loss", "eval/reg_loss", "eval/rewards/chosen", "eval/token_reward_agreement",
                "eval/logps/chosen", "eval/skipped_too_long"):
        assert key in evals[-1]

    # One process, one forward of every held-out pair, on the weights the run exported after its last step.
    dataset = EvalReader(ShardIndex(eval_shards))
    pairs = [dataset.read(*c) for c in dataset.coordinates()]
    assert len(pairs) == 17
    model = TokenLogprobs(AutoModelForCausalLM.from_pretrained(output / "final", dtype=torch.float32)).eval()
    inputs = collate(pairs, padding_free=False)
    with torch.no_grad():
        logps = scatter_tokens(model(inputs.input_ids, inputs.position_ids, inputs.predict_index,
                                     inputs.targets).logps, inputs.token_mask)
    n = inputs.num_pairs
    sides = [SideTokens(logps[rows], inputs.ref_logps[rows], inputs.rewards[rows], inputs.token_mask[rows])
             for rows in (slice(0, n), slice(n, 2 * n))]
    losses, metrics = preference_loss(*sides, replace(TrainConfig(), beta=0.1).loss_settings())
    expected = {"eval/loss": losses.mean(), "eval/rewards/accuracies": metrics["rewards/accuracies"].mean(),
                "eval/rewards/margins": metrics["rewards/margins"].mean()}
    for key, value in expected.items():
        assert evals[-1][key] == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # what it learned carries over to the held-out pairs


@pytest.mark.slow
def test_evaluation_leaves_the_training_unchanged(tiny_model, learnable_shards, eval_shards, tmp_path):
    results = {}
    for name, extra in (("plain", []), ("evaluated", ["--eval-data", eval_shards, "--eval-steps", "2"])):
        result = _train(tiny_model, learnable_shards, tmp_path / name, "--save-steps", "0", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = _training_lines(tmp_path / name)
    assert [row["step"] for row in read_metrics(tmp_path / "evaluated") if "eval/loss" in row] == list(range(2, 13, 2))
    for a, b in zip(results["plain"], results["evaluated"], strict=True):
        assert {key: a[key] for key in TRAINING} == {key: b[key] for key in TRAINING}, a["step"]


def ids(index: ShardIndex) -> list[str]:
    reader = EvalReader(index)
    return [reader.read(*c).id for c in reader.coordinates()]


def test_eval_fraction_holds_out_a_fixed_disjoint_share_of_the_pairs(learnable_shards):
    everything, kept = ShardIndex(learnable_shards), ShardIndex(learnable_shards, holdout=0.25)
    held = ShardIndex(learnable_shards, holdout=0.25, held_out=True)
    assert set(ids(kept)).isdisjoint(ids(held))
    assert sorted(ids(kept) + ids(held)) == sorted(ids(everything))
    assert kept.num_pairs + held.num_pairs == everything.num_pairs == 96 and 12 <= held.num_pairs <= 36
    # Training streams exactly the pairs kept, in an order that still depends on seed and epoch only.
    order = list(TrainingStream(kept, seed=1, buffer_size=16).order(epoch=0))
    assert sorted(order) == sorted(EvalReader(kept).coordinates()) and len(order) == kept.num_pairs
    assert list(TrainingStream(kept, seed=1, buffer_size=16).order(epoch=0)) == order
    # The same split on a fresh load (every rank, a resume), and a larger share holds out a superset.
    assert ids(ShardIndex(learnable_shards, holdout=0.25, held_out=True)) == ids(held)
    assert set(ids(held)) < set(ids(ShardIndex(learnable_shards, holdout=0.5, held_out=True)))


@pytest.mark.slow
def test_eval_fraction_trains_on_the_rest_and_evaluates_at_the_end(tiny_model, learnable_shards, tmp_path):
    kept = ShardIndex(learnable_shards, holdout=0.25).num_pairs
    command = train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                            *[a for a in ARGS if a not in ("--max-steps", "12")], "--eval-fraction", "0.25",
                            "--save-steps", "0")
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = kept // 8
    assert f"{kept} pairs, {steps} steps of 8; {96 - kept} held-out pairs to evaluate on" in result.stderr
    rows = read_metrics(tmp_path / "run")
    assert [row["step"] for row in rows if "eval/loss" in row] == [steps]  # --eval-steps 0: at the end only


def test_eval_settings_that_would_mix_two_runs_are_refused_on_resume():
    base = TrainConfig(model="m", data="d", output="o")
    older = {k: v for k, v in base.as_dict().items() if not k.startswith("eval_")}  # saved before evaluation existed
    assert changed_on_resume(older, base) == []
    assert changed_on_resume(base.as_dict(), replace(base, eval_steps=5)) == []
    for changed in (dict(eval_fraction=0.1), dict(eval_data="other")):
        [message] = changed_on_resume(base.as_dict(), replace(base, **changed))
        assert message.startswith("--" + next(iter(changed)).replace("_", "-"))


@pytest.mark.parametrize("extra, message", [
    (["--eval-data", "x", "--eval-fraction", "0.1"], "--eval-data or --eval-fraction, not both"),
    (["--eval-fraction", "1"], "--eval-fraction 1.0: it must be in [0, 1)"),
    (["--eval-steps", "5"], "--eval-steps needs pairs to evaluate on"),
    (["--eval-fraction", "0.0001"], "--eval-fraction 0.0001 holds out none of the 96 pairs"),
], ids=["both", "fraction-1", "steps-alone", "fraction-too-small"])
def test_bad_eval_settings_are_one_line(tiny_model, learnable_shards, tmp_path, extra, message):
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               *ARGS, *extra), timeout=300)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()
