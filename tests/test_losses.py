"""The losses against hand computation and against the gradient formulas of docs/METHOD.md §3."""

import math

import pytest
import torch

from treg_train.losses import LossSettings, SideTokens, preference_loss, token_reward_agreement

sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def _side(logps, ref, rewards, requires_grad=False):
    logps = torch.tensor([logps], dtype=torch.float64, requires_grad=requires_grad)
    return SideTokens(logps, torch.tensor([ref], dtype=torch.float64), torch.tensor([rewards], dtype=torch.float64),
                      torch.ones_like(logps, dtype=torch.bool))


# One pair, chosen 2 tokens, rejected 3 tokens.
CHOSEN = ([-1.0, -2.0], [-1.5, -2.5], [0.4, -0.2])
REJECTED = ([-1.0, -1.0, -3.0], [-0.5, -1.0, -2.0], [-0.3, 0.1, 0.0])


def test_dpo_by_hand():
    beta = 0.5
    loss, m = preference_loss(_side(*CHOSEN), _side(*REJECTED), LossSettings("dpo", beta=beta))
    r_w, r_l = beta * (0.5 + 0.5), beta * (-0.5 + 0.0 - 1.0)  # 0.5, -0.75
    assert m["rewards/chosen"].item() == pytest.approx(r_w) and m["rewards/rejected"].item() == pytest.approx(r_l)
    assert loss.item() == pytest.approx(-math.log(sig(r_w - r_l)))
    assert m["rewards/accuracies"].item() == 1.0 and m["reg_loss"].item() == 0.0


def test_dpo_reg_by_hand():
    beta, alpha = 0.5, 0.25
    loss, m = preference_loss(_side(*CHOSEN), _side(*REJECTED), LossSettings("dpo_reg", beta=beta, alpha=alpha))
    h = 0.5 - (-0.75)
    w = sig(-h)
    reg_w = -beta * (0.4 * -1.0 + -0.2 * -2.0)  # = 0
    reg_l = -beta * (-0.3 * -1.0 + 0.1 * -1.0 + 0.0)  # = -0.1
    assert m["mean_w"].item() == pytest.approx(w)
    assert loss.item() == pytest.approx(-math.log(sig(h)) + alpha * w * (reg_w + reg_l))


def test_simpo_and_simpo_reg_by_hand():
    beta, gamma, alpha = 2.0, 0.3, 0.5
    r_w, r_l = beta / 2 * -3.0, beta / 3 * -5.0  # -3, -3.333
    loss, m = preference_loss(_side(*CHOSEN), _side(*REJECTED), LossSettings("simpo", beta=beta, gamma=gamma))
    assert loss.item() == pytest.approx(-math.log(sig(r_w - r_l - gamma)))
    loss, m = preference_loss(_side(*CHOSEN), _side(*REJECTED),
                              LossSettings("simpo_reg", beta=beta, gamma=gamma, alpha=alpha))
    w = sig(r_l - r_w + gamma)
    reg = -(beta / 2) * (0.4 * -1.0 + -0.2 * -2.0) - (beta / 3) * (-0.3 * -1.0 + 0.1 * -1.0)
    assert m["mean_w"].item() == pytest.approx(w)
    assert loss.item() == pytest.approx(-math.log(sig(r_w - r_l - gamma)) + alpha * w * reg)


def test_static_weight_and_sft_chosen_by_hand():
    beta, alpha = 0.5, 0.25
    h = 1.25
    loss, m = preference_loss(_side(*CHOSEN), _side(*REJECTED),
                              LossSettings("dpo_reg", beta=beta, alpha=alpha, static_weight=True))
    assert m["mean_w"].item() == 1.0
    assert loss.item() == pytest.approx(-math.log(sig(h)) + alpha * (0.0 - 0.1))
    loss, _ = preference_loss(_side(*CHOSEN), _side(*REJECTED), LossSettings("sft_chosen", beta=beta, alpha=alpha))
    assert loss.item() == pytest.approx(-math.log(sig(h)) + alpha * 3.0)


def _random_sides(seed, pairs=4, tokens=6, requires_grad=True):
    g = torch.Generator().manual_seed(seed)

    def side():
        mask = torch.rand(pairs, tokens, generator=g) < 0.8
        mask[:, 0] = True
        logps = (-torch.rand(pairs, tokens, generator=g, dtype=torch.float64) * 3).requires_grad_(requires_grad)
        ref = -torch.rand(pairs, tokens, generator=g, dtype=torch.float64) * 3
        rewards = torch.rand(pairs, tokens, generator=g, dtype=torch.float64) - 0.5
        return SideTokens(logps, ref, rewards, mask)

    return side(), side()


def test_alpha_zero_is_exactly_dpo():
    chosen, rejected = _random_sides(0)
    dpo, _ = preference_loss(chosen, rejected, LossSettings("dpo", beta=0.1))
    reg, _ = preference_loss(chosen, rejected, LossSettings("dpo_reg", beta=0.1, alpha=0.0))
    assert torch.equal(dpo, reg)
    (g_dpo,) = torch.autograd.grad(dpo.sum(), chosen.logps)
    (g_reg,) = torch.autograd.grad(reg.sum(), chosen.logps)
    assert torch.equal(g_dpo, g_reg)


def test_no_gradient_flows_through_w():
    chosen, rejected = _random_sides(1)
    _, metrics = preference_loss(chosen, rejected, LossSettings("dpo_reg", beta=0.1))
    assert not metrics["mean_w"].requires_grad


@pytest.mark.parametrize("loss_type", ["dpo_reg", "simpo_reg"])
def test_per_token_gradient_matches_method_coefficients(loss_type):
    beta, alpha, gamma = 0.3, 0.5, 0.2
    chosen, rejected = _random_sides(2)
    loss, metrics = preference_loss(chosen, rejected, LossSettings(loss_type, beta=beta, alpha=alpha, gamma=gamma))
    g_w, g_l = torch.autograd.grad(loss.sum(), [chosen.logps, rejected.logps])
    w = metrics["mean_w"][:, None]
    scale_w = beta / chosen.length[:, None] if loss_type == "simpo_reg" else beta
    scale_l = beta / rejected.length[:, None] if loss_type == "simpo_reg" else beta
    # docs/METHOD.md §3: chosen β·(σ(−h) + α·w·r̂_t), rejected β·(−σ(−h) + α·w·r̂_t), as −∂L/∂log π.
    expected_w = scale_w * (w + alpha * w * chosen.rewards) * chosen.mask
    expected_l = scale_l * (-w + alpha * w * rejected.rewards) * rejected.mask
    torch.testing.assert_close(-g_w, expected_w)
    torch.testing.assert_close(-g_l, expected_l)


def test_a_step_raises_positive_and_lowers_negative_reward_tokens():
    """A policy with free logits per position: one step moves each token's likelihood in the
    direction of its r̂, in the chosen and in the rejected response."""
    torch.manual_seed(0)
    vocab, tokens = 7, 6
    targets = torch.randint(0, vocab, (2, tokens))
    rewards = torch.tensor([[0.4, -0.4, 0.3, -0.3, 0.45, -0.45]] * 2, dtype=torch.float32)
    logits = torch.nn.Parameter(torch.randn(2, tokens, vocab))
    ref = torch.log_softmax(logits.detach(), -1).gather(-1, targets[..., None]).squeeze(-1)

    def token_logps():
        return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)

    mask = torch.ones(1, tokens, dtype=torch.bool)
    before = token_logps().detach()
    logps = token_logps()
    chosen = SideTokens(logps[:1], ref[:1], rewards[:1], mask)
    rejected = SideTokens(logps[1:], ref[1:], rewards[1:], mask)
    loss, _ = preference_loss(chosen, rejected, LossSettings("dpo_reg", beta=1.0, alpha=5.0))
    loss.sum().backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    change = token_logps().detach() - before
    assert torch.equal(torch.sign(change), torch.sign(rewards)), change


def test_token_reward_agreement_is_a_correlation():
    chosen, rejected = _random_sides(3, requires_grad=False)
    chosen.logps = chosen.ref_logps + 2.0 * chosen.rewards  # implicit rewards proportional to r̂
    rejected.logps = rejected.ref_logps + 2.0 * rejected.rewards
    assert token_reward_agreement(chosen, rejected, beta=0.1).item() == pytest.approx(1.0)
    rejected.logps = rejected.ref_logps - 2.0 * rejected.rewards
    chosen.logps = chosen.ref_logps - 2.0 * chosen.rewards
    assert token_reward_agreement(chosen, rejected, beta=0.1).item() == pytest.approx(-1.0)
