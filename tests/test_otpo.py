"""OTPO (`--loss otpo`) against a hand computation of its authors' code (Mimasss2/OTPO, scripts/otpo_trainer.py:
`get_ot_weight` on the padded batch, then TRL's sigmoid DPO loss of the weighted sums), ties and edge cases included."""

import math

import ot
import pytest
import torch
import torch.nn.functional as F

from treg_train.losses import LossSettings, SideTokens, margin_weights, preference_loss


def official_ot_weights(hidden, loss_mask, len_chosen: int, reg: float, reg_m: float):
    """`get_ot_weight`: per pair, the cost over the whole padded length (prompt and padding as zero states with no
    mass), POT's stabilised unbalanced Sinkhorn, row and column sums rescaled to the shorter answer's length."""
    chosen_hs, rejected_hs = hidden[:len_chosen].detach(), hidden[len_chosen:].detach()
    chosen_mask, rejected_mask = loss_mask[:len_chosen], loss_mask[len_chosen:]
    chosen_weight, rejected_weight = torch.zeros_like(chosen_mask).float(), torch.zeros_like(rejected_mask).float()
    for i in range(len_chosen):
        P_mask_i, Q_mask_i = chosen_mask[i].float(), rejected_mask[i].float()
        P_valid, Q_valid = P_mask_i.unsqueeze(1) * chosen_hs[i], Q_mask_i.unsqueeze(1) * rejected_hs[i]
        cost_matrix = torch.cdist(P_valid.float(), Q_valid.float(), p=2) + 1e-6
        cost_matrix_max_element = abs(cost_matrix).max()
        if not torch.isnan(cost_matrix_max_element) and cost_matrix_max_element.item() > 1:
            cost_matrix = cost_matrix / cost_matrix_max_element
        cost_matrix = torch.nan_to_num(cost_matrix, nan=1e10)
        a = torch.ones(chosen_mask.shape[1]) * P_mask_i
        b = torch.ones(chosen_mask.shape[1]) * Q_mask_i
        G_uot = ot.unbalanced.sinkhorn_unbalanced(a, b, cost_matrix, reg, reg_m, method="sinkhorn_stabilized",
                                                  reg_type="entropy")  # POT 0.9.4's default, which the authors pin
        _scale_coeff = G_uot.sum() / min(a.sum(), b.sum())
        chosen_weight[i], rejected_weight[i] = G_uot.sum(axis=-1) / _scale_coeff, G_uot.sum(axis=0) / _scale_coeff
    return chosen_weight, rejected_weight


def _batch(seed: int, pairs: int = 4, prompt: int = 3, hidden: int = 8):
    """Padded rows [chosen; rejected] of prompt + response + padding, with the positions' hidden states, the
    policy's and the reference's per-token log-probs; pair 2's two answers are the same, pair 3's rejected one
    token long."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 4, 5, 6, 3, 9, 5, 1])[: 2 * pairs]
    width = prompt + int(lengths.max()) + 2
    states = torch.randn(2 * pairs, width, hidden, generator=g) * 3
    logps, ref_logps = (-torch.rand(2 * pairs, width, generator=g) * 4 for _ in range(2))
    for values in (states, logps, ref_logps):
        values[pairs + 2] = values[2]
    mask = torch.zeros(2 * pairs, width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, prompt:prompt + length] = True
    return states, logps, ref_logps, mask, lengths


def _sides(states, logps, ref_logps, mask, lengths):
    """treg's SideTokens: each response's tokens from the start of its row, right-padded."""
    rows, longest = mask.shape[0], int(lengths.max())
    token_mask = torch.arange(longest)[None] < lengths[:, None]

    def packed(values):
        out = values.new_zeros((rows, longest) + values.shape[2:])
        out[token_mask] = values[mask]
        return out

    tokens = [packed(v) for v in (logps, ref_logps, states)]
    pairs = rows // 2
    return [SideTokens(tokens[0][r], tokens[1][r], torch.zeros_like(tokens[0][r]), token_mask[r], hidden=tokens[2][r])
            for r in (slice(0, pairs), slice(pairs, rows))]


@pytest.mark.parametrize("epsilon", [1.0, 0.1])
def test_otpo_weights_and_loss_match_the_official_code(epsilon):
    states, logps, ref_logps, mask, lengths = _batch(seed=0)
    official_w, official_l = official_ot_weights(states, mask, 4, epsilon, 0.2)
    chosen, rejected = _sides(states, logps, ref_logps, mask, lengths)
    settings = LossSettings("otpo", beta=0.01, weighting="otpo", otpo_epsilon=epsilon, otpo_reg_m=0.2)
    ours_w, ours_l = margin_weights(chosen, rejected, settings)
    assert torch.allclose(ours_w[chosen.mask], official_w[mask[:4]], rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours_l[rejected.mask], official_l[mask[4:]], rtol=1e-5, atol=1e-6)
    shorter = torch.minimum(lengths[:4], lengths[4:]).float()
    assert torch.allclose(ours_w.sum(-1), shorter) and torch.allclose(ours_l.sum(-1), shorter)  # both sum to it

    def weighted(values, weights):
        return (values * weights).sum(-1)

    margin = (weighted(logps[:4], official_w) - weighted(ref_logps[:4], official_w)
              - weighted(logps[4:], official_l) + weighted(ref_logps[4:], official_l))
    ours, metrics = preference_loss(chosen, rejected, settings)
    assert torch.allclose(ours, -F.logsigmoid(0.01 * margin), rtol=1e-6)
    assert ours[2].item() == pytest.approx(math.log(2), abs=1e-7)  # the same answer twice: the same weights
    assert "skipped_zero_weights" in metrics


def test_otpo_trains_a_real_model(tiny_model, learnable_shards, tmp_path):
    from helpers import read_metrics, run, train_command

    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               "--loss", "otpo", "--max-steps", "2", "--global-batch-size", "4",
                               "--logging-steps", "1", "--learning-rate", "1e-4"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in read_metrics(tmp_path / "run") if "loss" in line]
    assert len(lines) == 2 and all(math.isfinite(line["loss"]) for line in lines)
    assert lines[-1]["skipped_zero_weights"] == 0


def test_a_transport_the_sinkhorn_cannot_compute_is_counted_not_blamed_on_the_policy():
    """Below some ε POT's stabilised Sinkhorn overflows in float32 and the weights are NaN: each such pair is
    counted (the step stops the run on it), and only where the hidden states themselves are finite."""
    states, logps, ref_logps, mask, lengths = _batch(seed=1)
    chosen, rejected = _sides(states, logps, ref_logps, mask, lengths)
    with pytest.warns(UserWarning, match="did not converge"):
        _, failed = preference_loss(chosen, rejected, LossSettings("otpo", weighting="otpo", otpo_epsilon=1e-30))
    assert failed["otpo_not_finite"].tolist() == [1.0] * 4
    _, fine = preference_loss(chosen, rejected, LossSettings("otpo", weighting="otpo"))
    assert fine["otpo_not_finite"].tolist() == [0.0] * 4
    chosen.hidden[0, 0, 0] = math.nan  # a policy gone NaN is not the Sinkhorn's doing
    with pytest.warns(UserWarning):
        _, blown = preference_loss(chosen, rejected, LossSettings("otpo", weighting="otpo", otpo_epsilon=1e-30))
    assert blown["otpo_not_finite"].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_a_run_whose_transport_overflows_stops_naming_the_epsilon(tiny_model, learnable_shards, tmp_path):
    from helpers import assert_one_line_error, run, train_command

    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               "--loss", "otpo", "--otpo-epsilon", "1e-30", "--max-steps", "1",
                               "--global-batch-size", "4"))
    assert_one_line_error(result, "OTPO's token weights are not finite", "raise --otpo-epsilon")
    assert not (tmp_path / "run" / "final").exists()
