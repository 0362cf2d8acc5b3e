"""The token-weighted margin: the objectives from before it are unchanged bit for bit, and D²PO, ConfPO and
WPO's official weight equal a hand computation of their authors' code (`LotuSrc/D2PO` trainer_utils.py
get_batch_logps; `hee-suk-yoon/ConfPO` cpo_trainer.py cpo_loss_confpo; `wzhouad/WPO` run_wpo.py), on random
tensors and on one real batch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run, train_command

from treg_train.losses import LossSettings, SideTokens, preference_loss


def random_sides(seed: int = 0, pairs: int = 5, tokens: int = 9, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)

    def side():
        lengths = torch.randint(1, tokens + 1, (pairs,), generator=generator)
        mask = torch.arange(tokens)[None] < lengths[:, None]
        values = [torch.rand(pairs, tokens, generator=generator, dtype=dtype) for _ in range(4)]
        logps, ref, log_sum_sq = (-3 * v * mask for v in values[:3])
        return SideTokens(logps, ref, (values[3] - 0.5) * mask, mask, log_sum_sq)

    return side(), side()


def reference_loss(chosen: SideTokens, rejected: SideTokens, s: LossSettings) -> torch.Tensor:
    """The objectives as they were computed before token weights, operation for operation."""
    if s.loss_type.startswith("simpo"):
        scale_w, scale_l = s.beta / chosen.length, s.beta / rejected.length
        reward_w, reward_l = scale_w * chosen.sum(chosen.logps), scale_l * rejected.sum(rejected.logps)
        margin = reward_w - reward_l - s.gamma
    else:
        scale_w = scale_l = torch.full_like(chosen.length, s.beta, dtype=chosen.logps.dtype)
        reward_w = s.beta * chosen.sum(chosen.logps - chosen.ref_logps)
        reward_l = s.beta * rejected.sum(rejected.logps - rejected.ref_logps)
        margin = reward_w - reward_l
    preference = -F.logsigmoid(margin)
    weight = torch.sigmoid(-margin).detach()
    if s.loss_type.startswith("wpo"):
        def omega(side):
            return torch.exp(side.sum(side.logps.detach() - side.log_sum_sq_probs) / side.length)

        preference = omega(chosen) * omega(rejected) * preference
    if s.loss_type.endswith("_reg"):
        reg_w = -scale_w * chosen.sum(chosen.rewards * chosen.logps)
        reg_l = -scale_l * rejected.sum(rejected.rewards * rejected.logps)
        return preference + s.alpha * weight * (reg_w + reg_l)
    if s.loss_type == "sft_chosen":
        return preference + s.alpha * -chosen.sum(chosen.logps)
    return preference + torch.zeros_like(preference)


@pytest.mark.parametrize("loss_type", ["dpo", "dpo_reg", "simpo", "simpo_reg", "wpo", "wpo_reg", "sft_chosen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_objectives_before_token_weights_are_unchanged_bit_for_bit(loss_type, dtype):
    chosen, rejected = random_sides(1, dtype=dtype)
    settings = LossSettings(loss_type, beta=0.3, alpha=0.25, gamma=0.2 if loss_type.startswith("simpo") else 0.0,
                            wpo_clamp=False)  # TRL's unclamped WPO weight, what treg computed before
    got, _ = preference_loss(chosen, rejected, settings)
    assert torch.equal(got, reference_loss(chosen, rejected, settings))


# ---- the methods by hand, one token at a time, as their authors' code computes them ----------------------


def d2po_by_hand(chosen, rejected, beta, discount):
    """LotuSrc/D2PO: S(y) = Σ_t γ^t ℓ_t with t = 1 at the first response token, for policy and reference alike;
    then TRL's sigmoid DPO loss."""
    def decayed(side, values, pair):
        return sum(discount ** (t + 1) * float(values[pair, t]) for t in range(int(side.mask[pair].sum())))

    losses = []
    for pair in range(chosen.logps.shape[0]):
        logits = (decayed(chosen, chosen.logps, pair) - decayed(chosen, chosen.ref_logps, pair)) - (
            decayed(rejected, rejected.logps, pair) - decayed(rejected, rejected.ref_logps, pair))
        losses.append(math.log1p(math.exp(-beta * logits)))
    return np.array(losses)


def confpo_by_hand(chosen, rejected, beta, gamma):
    """hee-suk-yoon/ConfPO: the tokens with log p_t < log(mean_t p_t) (strictly), SimPO on their mean log-prob;
    a pair where either side selects none contributes 0."""
    losses = []
    for pair in range(chosen.logps.shape[0]):
        means = []
        for side in (chosen, rejected):
            logps = [float(v) for v in side.logps[pair, : int(side.mask[pair].sum())]]
            threshold = math.log(sum(math.exp(v) for v in logps) / len(logps))
            selected = [v for v in logps if v < threshold]
            means.append(sum(selected) / len(selected) if selected else None)
        if None in means:
            losses.append(0.0)
        else:
            losses.append(math.log1p(math.exp(-(beta * (means[0] - means[1]) - gamma))))
    return np.array(losses)


def test_d2po_is_its_authors_formula():
    chosen, rejected = random_sides(2, pairs=8, tokens=12)
    got, _ = preference_loss(chosen, rejected, LossSettings("d2po", beta=0.1, d2po_discount=0.98, weighting="d2po"))
    np.testing.assert_allclose(got.numpy(), d2po_by_hand(chosen, rejected, 0.1, 0.98), rtol=1e-12)


def test_confpo_is_its_authors_formula_and_an_empty_selection_contributes_nothing():
    chosen, rejected = random_sides(3, pairs=8, tokens=12)
    chosen.mask[0] = torch.arange(12) < 1  # one token: its log-prob is the mean's log, so nothing is below it
    got, _ = preference_loss(chosen, rejected, LossSettings("confpo", beta=1.5, gamma=1.6, weighting="confpo"))
    want = confpo_by_hand(chosen, rejected, 1.5, 1.6)
    assert want[0] == 0 and got[0] == 0 and (want > 0).sum() >= 3
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_confpo_selects_without_a_gradient_and_its_loss_has_one():
    chosen, rejected = random_sides(4)
    chosen.logps.requires_grad_(True)
    loss, _ = preference_loss(chosen, rejected, LossSettings("confpo", beta=1.5, gamma=1.6, weighting="confpo"))
    loss.sum().backward()
    assert chosen.logps.grad.abs().sum() > 0 and torch.isfinite(chosen.logps.grad).all()


def test_wpo_weight_is_clamped_at_one_as_its_authors_compute_it_and_trls_is_not():
    chosen, rejected = random_sides(5)
    for side in (chosen, rejected):  # responses likelier than the policy's agreement with itself: ω > 1
        side.log_sum_sq_probs = side.logps - 0.5 * side.mask
    margin_w = 0.1 * chosen.sum(chosen.logps - chosen.ref_logps)
    dpo = -F.logsigmoid(margin_w - 0.1 * rejected.sum(rejected.logps - rejected.ref_logps))
    product = torch.exp(0.5 * chosen.sum(chosen.mask.double()) / chosen.length
                        + 0.5 * rejected.sum(rejected.mask.double()) / rejected.length)
    assert (product > 1).all()
    official, metrics = preference_loss(chosen, rejected, LossSettings("wpo", beta=0.1))  # the default: clamped
    trl, _ = preference_loss(chosen, rejected, LossSettings("wpo", beta=0.1, wpo_clamp=False))
    torch.testing.assert_close(official, torch.minimum(torch.ones_like(product), product) * dpo, rtol=1e-12, atol=0)
    torch.testing.assert_close(trl, product * dpo, rtol=1e-12, atol=0)
    assert (metrics["wpo_weight"] == 1).all()


def test_a_weighting_composes_with_t_reg():
    """dpo_reg with D²PO's weights: the weighted margin in the DPO term and in the pair weight w; T-REG's
    regularizer as in dpo_reg."""
    chosen, rejected = random_sides(6)
    settings = LossSettings("dpo_reg", beta=0.1, alpha=0.25, weighting="d2po", d2po_discount=0.9)
    got, _ = preference_loss(chosen, rejected, settings)
    dpo = torch.tensor(d2po_by_hand(chosen, rejected, 0.1, 0.9))
    margin = -torch.log(torch.expm1(dpo))  # −log σ(h) = log(1 + e^−h)
    reg = -0.1 * (chosen.sum(chosen.rewards * chosen.logps) + rejected.sum(rejected.rewards * rejected.logps))
    torch.testing.assert_close(got, dpo + 0.25 * torch.sigmoid(-margin) * reg, rtol=1e-9, atol=1e-12)


def test_the_methods_on_one_real_batch(tiny_model, learnable_shards):
    """A real batch: pairs from the shards, log-probs of a perturbed policy (so ρ ≠ 0) through treg's kernel."""
    from helpers import perturbed_policy_logps

    chosen, rejected = perturbed_policy_logps(tiny_model, learnable_shards, pairs=6)
    got, _ = preference_loss(chosen, rejected, LossSettings("d2po", beta=0.1, weighting="d2po"))
    np.testing.assert_allclose(got.double().numpy(), d2po_by_hand(chosen, rejected, 0.1, 0.98), rtol=1e-5)
    got, _ = preference_loss(chosen, rejected, LossSettings("confpo", beta=1.5, gamma=1.6, weighting="confpo"))
    np.testing.assert_allclose(got.double().numpy(), confpo_by_hand(chosen, rejected, 1.5, 1.6), rtol=1e-5)


def test_the_new_objectives_train_and_refuse_a_mixed_weighting(tiny_model, learnable_shards, tmp_path):
    for loss in ("d2po", "confpo"):
        result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / loss,
                                   "--loss", loss, "--global-batch-size", "8", "--max-steps", "2",
                                   "--logging-steps", "1", "--save-steps", "0"))
        assert result.returncode == 0, result.stderr[-2000:]
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "mixed",
                               "--loss", "d2po", "--token-weighting", "confpo"))
    assert result.returncode == 2 and "weights tokens its own way" in result.stderr
