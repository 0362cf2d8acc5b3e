"""cDPO (`--loss cdpo`) against a hand computation of its authors' code (chenzhiling9954/Critical-Tokens-Matter,
src/train/train_cdpo.py: `CDPOTrainer.dpo_loss` with only_neg, on TRL 0.9.6's padded rows), ties and edge cases
included."""

import math

import pytest
import torch
import torch.nn.functional as F

from treg_train.losses import LossSettings, SideTokens, preference_loss


def official_cdpo(prompt: int, chosen, rejected, ce_prob, beta: float) -> torch.Tensor:
    """One pair (batch size 1), as TRL builds its rows: P − 1 prompt labels (masked), then each answer's tokens, the
    end-of-sequence last, padded to the longer; `chosen`/`rejected` = (policy, reference) per-token log-probs of the
    answer; `ce_prob` the rejected answer's p_ce of every token but that last one, which the code appends as 0."""
    width = prompt - 1 + max(len(chosen[0]), len(rejected[0]))

    def row(values):
        out = torch.zeros(width, dtype=torch.float64)
        out[prompt - 1:prompt - 1 + len(values)] = values
        return out

    policy_chosen_logps, reference_chosen_logps = row(chosen[0])[None], row(chosen[1])[None]
    policy_rejected_logps, reference_rejected_logps = row(rejected[0])[None], row(rejected[1])[None]
    prompt_ce = torch.rand(prompt - 1, dtype=torch.float64)  # the prompt's own scores: they meet masked log-probs
    rejected_list = [1 - torch.cat([prompt_ce, ce_prob, torch.zeros(1, dtype=torch.float64)])]
    rejected_rewards = torch.nn.utils.rnn.pad_sequence(rejected_list, batch_first=True, padding_value=0)
    rejected_rewards = F.pad(rejected_rewards, (0, width - rejected_rewards.shape[1]))
    chosen_logratio = policy_chosen_logps - reference_chosen_logps
    rejected_logratio = rejected_rewards * (policy_rejected_logps - reference_rejected_logps)
    logits = chosen_logratio - rejected_logratio
    losses = -F.logsigmoid(beta * logits)
    return losses.mean()


@pytest.mark.parametrize("lengths", [(5, 3), (2, 6), (4, 4), (3, 1)])
def test_cdpo_matches_the_official_code_for_one_pair(lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    prompt, (chosen_length, rejected_length) = 4, lengths
    sides = [[-torch.rand(n, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
             for n in (chosen_length, rejected_length)]
    ce_logps = -torch.rand(rejected_length, generator=g, dtype=torch.float64) * 2
    official = official_cdpo(prompt, sides[0], sides[1], ce_logps[:-1].exp(), beta=0.1)

    width = max(lengths)
    ours = []
    for (policy, reference), n, signal in zip(sides, lengths, (torch.zeros(chosen_length).double(), ce_logps)):
        mask = torch.arange(width)[None] < n
        ours.append(SideTokens(F.pad(policy, (0, width - n))[None], F.pad(reference, (0, width - n))[None],
                               torch.zeros(1, width).double(), mask, signal=F.pad(signal, (0, width - n))[None],
                               prompt_length=torch.tensor([prompt])))
    losses, _ = preference_loss(*ours, LossSettings("cdpo", beta=0.1, weighting="cdpo"))
    assert losses.item() == pytest.approx(official.item(), rel=1e-12)


def test_identical_answers_weighed_alike_leave_log_2_at_every_position():
    """p_ce ≈ 0 on every rejected token weighs each 1 (the last weighs 1 anyway): with the two answers alike, every
    position's margin is 0."""
    logps, ref = -torch.rand(1, 5, dtype=torch.float64), -torch.rand(1, 5, dtype=torch.float64)
    mask = torch.ones(1, 5, dtype=torch.bool)
    chosen = SideTokens(logps, ref, torch.zeros_like(logps), mask, prompt_length=torch.tensor([3]))
    rejected = SideTokens(logps, ref, torch.zeros_like(logps), mask, signal=torch.full_like(logps, -1e4),
                          prompt_length=torch.tensor([3]))
    losses, _ = preference_loss(chosen, rejected, LossSettings("cdpo", beta=0.1, weighting="cdpo"))
    assert losses.item() == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.slow
def test_cdpo_trains_on_shards_scored_with_a_positive_and_a_negative_model(tiny_model, tmp_path):
    """treg-score --ce-scores with two models, then treg-train --loss cdpo on those shards; without the column the
    run is refused naming the flag that writes it."""
    from helpers import (
        assert_one_line_error,
        hf_score_config,
        make_learnable_pairs,
        perturbed_copy,
        read_metrics,
        run,
        train_command,
        write_jsonl,
    )

    from treg_data import pipeline

    data = write_jsonl(tmp_path / "pairs.jsonl", make_learnable_pairs(8))
    models = [perturbed_copy(tiny_model, tmp_path / name, seed=seed) for seed, name in ((5, "pos"), (6, "neg"))]
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", dpo_model=models[0],
                                 reverse_dpo_model=models[1], ce_scores=True))
    result = run(train_command("--model", tiny_model, "--data", tmp_path / "scored", "--output", tmp_path / "run",
                               "--loss", "cdpo", "--max-steps", "2", "--global-batch-size", "4", "--logging-steps",
                               "1", "--learning-rate", "1e-4"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in read_metrics(tmp_path / "run") if "loss" in line]
    assert len(lines) == 2 and all(0 < line["loss"] < 10 for line in lines)

    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "plain"))
    refused = run(train_command("--model", tiny_model, "--data", tmp_path / "plain", "--output", tmp_path / "run2",
                                "--loss", "cdpo", "--max-steps", "1", "--global-batch-size", "4"))
    assert_one_line_error(refused, "ce_logps", "--ce-scores")


@pytest.mark.parametrize("flags", [("--loss", "cdpo"), ("--loss", "dpo_reg", "--token-weighting", "cdpo")])
def test_swapped_pairs_are_refused_with_cdpo_weights(flags, tmp_path):
    """cDPO's weights mark the rejected answer's critical tokens by a positive model against a negative one: with
    chosen and rejected swapped they would contrast the wrong way, so the settings are refused before any work."""
    from helpers import assert_one_line_error, run, train_command

    result = run(train_command("--model", tmp_path / "m", "--data", tmp_path / "d", "--output", tmp_path / "o",
                               *flags, "--swap-pairs"))
    assert_one_line_error(result, "--swap-pairs with cDPO's weights", "--chosen-column rejected")
