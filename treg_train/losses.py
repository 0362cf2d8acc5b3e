"""Preference losses as pure functions of per-token tensors (docs/METHOD.md §1 and §3).

Every tensor is [pairs, tokens], padded, with a boolean mask of real response tokens:
policy log-probs, reference log-probs and token rewards r̂ for the chosen and the rejected
response. The result is one loss per pair plus metrics; no model and no I/O in here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treg_train.objectives import REFERENCE_FREE, WEIGHTINGS, method, reference_free

TIS_DPO_RANGE = (0.7, 1.3)  # TIS-DPO's rank weights run linearly from the lowest to the highest


@dataclass
class SideTokens:
    """One response per pair: [pairs, tokens] tensors."""

    logps: torch.Tensor  # log π_θ(y_t | x, y_<t)
    ref_logps: torch.Tensor  # log π_ref(y_t | x, y_<t)
    rewards: torch.Tensor  # r̂_t (or another per-token column)
    mask: torch.Tensor  # True on response tokens
    log_sum_sq_probs: torch.Tensor | None = None  # log Σ_v π_θ(v | x, y_<t)², for WPO's weight
    signal: torch.Tensor | None = None  # a token-level contrast from the shards, for a weighting that needs one
    kl: torch.Tensor | None = None  # KL(π_ref ‖ π_θ) at each position (TDPO), with the policy's gradient
    hidden: torch.Tensor | None = None  # [pairs, tokens, H]: the policy's final hidden states, detached (OTPO)
    prompt_length: torch.Tensor | None = None  # [pairs]: tokens of each pair's prompt (cDPO's normaliser)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return (values * self.mask).sum(-1)

    @property
    def length(self) -> torch.Tensor:
        return self.mask.sum(-1).clamp(min=1)


@dataclass(frozen=True)
class LossSettings:
    loss_type: str = "dpo_reg"
    beta: float = 0.01
    alpha: float = 0.25
    gamma: float = 0.0  # SimPO's target margin
    static_weight: bool = False  # ablation: w ≡ 1 instead of the detached DPO pair weight
    weighting: str = "none"  # token weights a_t of the margin (objectives.WEIGHTINGS)
    d2po_discount: float = 0.98  # D²PO's γ: a_t = γ^t
    tgdpo_alpha: float = 0.5  # TGDPO's α: a_t = 1 ± αβ s_t
    sepo_ratio: float = 0.3  # SePO's k: the share of a response's tokens selected
    wpo_clamp: bool = True  # WPO's official pair weight min(1, ·); False: TRL's use_weighting, unclamped
    tdpo_alpha: float = 0.5  # TDPO2's α: the weight of the sequential KL in the margin
    otpo_epsilon: float = 1.0  # OTPO's entropic regularisation ε of the Sinkhorn
    otpo_reg_m: float = 0.2  # OTPO's marginal relaxation τ (KL to each side's uniform mass)

    def __post_init__(self):
        """Settings no objective means, refused when made rather than at the first step (treg-train's flags are
        checked before this, with the flag named: treg_train/config.py)."""
        own = method(self.loss_type).weighting
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown token weighting {self.weighting!r}; expected one of {tuple(WEIGHTINGS)}")
        if own != "none" and self.weighting != own:
            # without its own weights a token-level method would silently be plain DPO or SimPO
            raise ValueError(f"loss {self.loss_type!r} weights tokens its own way: give weighting={self.loss_type!r}")
        ranges = {"beta": (self.beta > 0, " above 0"), "alpha": (self.alpha >= 0, " >= 0"), "gamma": (True, ""),
                  "d2po_discount": (0 < self.d2po_discount <= 1, " in (0, 1]"),
                  "tgdpo_alpha": (self.tgdpo_alpha >= 0, " >= 0"),
                  "sepo_ratio": (0 < self.sepo_ratio <= 1, " in (0, 1]"),
                  "tdpo_alpha": (self.tdpo_alpha >= 0, " >= 0"), "otpo_epsilon": (self.otpo_epsilon > 0, " above 0"),
                  "otpo_reg_m": (self.otpo_reg_m > 0, " above 0")}
        for name, (inside, what) in ranges.items():
            if not (inside and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number{what}, got {getattr(self, name)!r}")


def token_weights(side: SideTokens, settings: LossSettings, chosen: bool) -> torch.Tensor | None:
    """Detached per-token weights a_t [pairs, tokens] of the margin, zero off the mask; None: every token 1.
    `side.signal` s_t is the weighting's token-level contrast of two shard columns (TrainConfig.signal_columns).

    - d2po (D²PO, `LotuSrc/D2PO`): a_t = γ^t, t = 1 at the first response token.
    - confpo (ConfPO, `hee-suk-yoon/ConfPO`): 1 on the tokens the policy finds less likely than its mean
      probability over the response, log π_θ(y_t) < log mean_t π_θ(y_t) (strictly); 0 elsewhere.
    - tgdpo (TGDPO, `dvlab-research/TGDPO`): a_t = 1 + αβ s_t on the chosen side, 1 − αβ s_t on the rejected,
      s = log π_dpo − log π_ref; unbounded.
    - tis_dpo (TIS-DPO, `exlaw/TIS-DPO`): `tis_dpo_rank_weights` of s = log π_good − log π_bad (chosen) or of −s
      (rejected).
    - sepo (SePO, `SteveKGYang/SePO`): 1 on `sepo_selection` of s = log π_dpo − log π_ref (chosen: the highest,
      rejected: the lowest); 0 elsewhere.
    """
    if settings.weighting == "none":
        return None
    mask = side.mask.to(side.logps.dtype)
    if settings.weighting == "d2po":
        return settings.d2po_discount ** torch.cumsum(mask, dim=-1) * mask
    if settings.weighting == "confpo":
        logps = side.logps.detach()
        mean_prob = side.sum(logps.exp()) / side.length
        return (logps < mean_prob.log()[:, None]).to(logps.dtype) * mask
    if settings.weighting not in WEIGHTINGS:
        raise ValueError(f"unknown token weighting {settings.weighting!r}; expected one of {tuple(WEIGHTINGS)}")
    if settings.weighting == "cdpo":
        return cdpo_weights(side, chosen)
    if side.signal is None and WEIGHTINGS[settings.weighting].signals:
        raise ValueError(f"the {settings.weighting} weighting needs the shards' token signal (SideTokens.signal)")
    signal = side.signal.detach().to(side.logps.dtype) * (1 if chosen else -1)  # larger: more credit
    if settings.weighting == "tgdpo":
        return (1 + settings.tgdpo_alpha * settings.beta * signal) * mask
    if settings.weighting == "tis_dpo":
        return tis_dpo_rank_weights(signal, side.mask).to(side.logps.dtype)
    if settings.weighting == "sepo":
        return sepo_selection(signal, side.mask, settings.sepo_ratio).to(side.logps.dtype)
    raise ValueError(f"the {settings.weighting} weighting weighs the two sides together: call margin_weights")


def cdpo_weights(side: SideTokens, chosen: bool) -> torch.Tensor:
    """cDPO's weights (chenzhiling9954/Critical-Tokens-Matter, train_cdpo.py: CDPOTrainer.dpo_loss, only_neg): 1 on
    the chosen answer; 1 − p_ce(y_t) on the rejected one, s = log p_ce (the shards' *_ce_logps), and 1 on its last
    token, as on the end-of-sequence token the authors append after their scores."""
    mask = side.mask.to(side.logps.dtype)
    if chosen:
        return mask
    if side.signal is None:
        raise ValueError("cDPO needs the rejected answer's log p_ce (SideTokens.signal: the shards' *_ce_logps)")
    last = torch.arange(mask.shape[-1], device=mask.device)[None] == side.length[:, None] - 1
    return torch.where(last, 1.0, 1 - side.signal.detach().to(mask.dtype).exp()) * mask


def per_position_preference(chosen: SideTokens, rejected: SideTokens, weights_l: torch.Tensor,
                            beta: float) -> torch.Tensor:
    """cDPO's preference loss per pair, as its authors' code computes it for a batch of one pair: the mean over the
    T = P − 1 + max(|y_w|, |y_l|) label positions of a prompt of P tokens of −log σ(β (Δ^w_j − a_j Δ^l_j)), with
    Δ = log π_θ − log π_ref of each answer's j-th token (0 past its end); the prompt's positions add log 2 each."""
    width = max(chosen.mask.shape[-1], rejected.mask.shape[-1])

    def padded(values: torch.Tensor) -> torch.Tensor:
        return F.pad(values, (0, width - values.shape[-1]))

    delta_w = padded((chosen.logps - chosen.ref_logps) * chosen.mask)
    delta_l = padded(weights_l * (rejected.logps - rejected.ref_logps) * rejected.mask)
    active = (padded(chosen.mask.to(delta_w.dtype)) + padded(rejected.mask.to(delta_w.dtype))).clamp(max=1)
    per_position = -F.logsigmoid(beta * (delta_w - delta_l)) * active
    if chosen.prompt_length is None:
        raise ValueError("cDPO's normaliser needs each prompt's length (SideTokens.prompt_length)")
    prompt = chosen.prompt_length.to(delta_w.dtype)
    return (per_position.sum(-1) + (prompt - 1) * math.log(2)) / (prompt - 1 + active.sum(-1))


def _ranks(keys: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
    """Each position's place (0 = first) in its row when the `ranked` positions are sorted by ascending key, ties
    to the earlier position (Python's stable sort, as the authors' code has); the others come after them."""
    order = torch.argsort(keys.masked_fill(~ranked, torch.inf), dim=-1, stable=True)
    places = torch.arange(keys.shape[-1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)


def tis_dpo_rank_weights(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TIS-DPO's `rank_based` transform (exlaw/TIS-DPO, preference_datasets.py): within each response, the
    tokens but the last ranked by their key rounded to two decimals (the weights file stores them so), mapped
    linearly to [0.7, 1.3] from the lowest to the highest; one such token weighs 1. The last token, the
    end of the response, weighs 0, as the appended EOS does there."""
    lengths = mask.sum(-1, keepdim=True)
    ranked = torch.arange(mask.shape[-1], device=mask.device)[None] < lengths - 1
    keys = torch.round(keys.double() * 100) / 100
    count = (lengths - 1).clamp(min=1).double()
    low, high = TIS_DPO_RANGE
    weights = low + _ranks(keys, ranked).double() / (count - 1).clamp(min=1) * (high - low)
    return torch.where(count == 1, torch.ones_like(weights), weights) * ranked


def sepo_selection(keys: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """SePO's token selection (SteveKGYang/SePO, token_score.py get_topK): within each response of L tokens, the
    ⌊ratio·(L − 1)⌋ tokens with the largest key among all but the first (its scores are shifted by one token),
    ties to the earlier token. True on the selected tokens."""
    lengths = mask.sum(-1, keepdim=True)
    positions = torch.arange(mask.shape[-1], device=mask.device)[None]
    candidates = (positions >= 1) & (positions < lengths)
    count = torch.floor(ratio * (lengths - 1).double())
    return (_ranks(-keys, candidates) < count) & candidates


def preference_loss(chosen: SideTokens, rejected: SideTokens,
                    settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [pairs] and per-pair metrics (each [pairs], to be averaged by the caller).

    The margin is z = β (Σ_t a^w_t x^w_t / N_w − Σ_t a^l_t x^l_t / N_l) − γ with detached token weights a_t
    (`token_weights`; 1 without a weighting): x = log π_θ − log π_ref and N = 1 for the DPO family, x = log π_θ
    and N = Σ_t a_t for the SimPO family. A SimPO-family pair whose weights are all zero on a side (ConfPO
    selected no token) contributes nothing."""
    alpha, row = settings.alpha, method(settings.loss_type)
    weights = margin_weights(chosen, rejected, settings)
    (reward_w, token_scale_w, kept_w), (reward_l, token_scale_l, kept_l) = (
        side_reward(side, settings, side_weights) for side, side_weights in zip((chosen, rejected), weights))
    margin = reward_w - reward_l - settings.gamma if reference_free(settings.loss_type) else reward_w - reward_l
    margin, kl_w, kl_l = with_sequential_kl(margin, chosen, rejected, settings)
    preference = (per_position_preference(chosen, rejected, weights[1], settings.beta) if row.per_position
                  else -F.logsigmoid(margin))
    weight = torch.sigmoid(-margin).detach()  # the preference gradient's own pair weight, sg[·]
    if settings.static_weight:
        weight = torch.ones_like(weight)

    if row.pair_weight == "wpo":
        # WPO: the preference loss of each pair weighted by how likely the policy finds the pair.
        pair_weight = wpo_weight(chosen) * wpo_weight(rejected)
        if settings.wpo_clamp:
            pair_weight = pair_weight.clamp(max=1.0)
        preference = pair_weight * preference

    if row.regularizer == "treg":
        # L_REG(y) = − Σ_t scale · r̂_t · log π_θ(y_t): a token-weighted likelihood term.
        reg_w = -token_scale_w * chosen.sum(chosen.rewards * chosen.logps)
        reg_l = -token_scale_l * rejected.sum(rejected.rewards * rejected.logps)
        regularizer = alpha * weight * (reg_w + reg_l)
    elif row.regularizer == "sft":
        regularizer = alpha * -chosen.sum(chosen.logps)
    else:
        regularizer = torch.zeros_like(preference)
    losses = preference + regularizer
    if kept_w is not None and row.family == REFERENCE_FREE:
        losses = torch.where(kept_w & kept_l, losses, torch.zeros_like(losses))

    metrics = {
        "dpo_loss": preference.detach(),
        "reg_loss": regularizer.detach(),
        "mean_w": weight,
        **({"wpo_weight": pair_weight} if row.pair_weight == "wpo" else {}),
        "rewards/chosen": reward_w.detach(),
        "rewards/rejected": reward_l.detach(),
        "rewards/margins": (reward_w - reward_l).detach(),
        "rewards/accuracies": (reward_w > reward_l).float().detach(),
        "logps/chosen": chosen.sum(chosen.logps).detach(),
        "logps/rejected": rejected.sum(rejected.logps).detach(),
    }
    if row.sequential_kl != "none":
        metrics.update({"kl/chosen": kl_w.detach(), "kl/rejected": kl_l.detach()})
    if kept_w is not None:
        metrics["skipped_zero_weights"] = without_gradient(kept_w, kept_l, settings.loss_type).float()
    if settings.weighting == "otpo":
        metrics["otpo_not_finite"] = transport_failed(chosen, rejected, weights).float()
    return losses, metrics


def transport_failed(chosen: SideTokens, rejected: SideTokens,
                     weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The pairs [pairs] whose OTPO weights are not finite though both answers' hidden states are: POT's Sinkhorn
    overflowed (an --otpo-epsilon too small for it), not the policy."""
    finite = [torch.isfinite(values).flatten(1).all(-1) for values in (chosen.hidden, rejected.hidden, *weights)]
    return finite[0] & finite[1] & ~(finite[2] & finite[3])


def with_sequential_kl(margin: torch.Tensor, chosen: SideTokens, rejected: SideTokens,
                       settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """TDPO's margin and each answer's sequential KL D(y) = Σ_t KL(π_ref ‖ π_θ)(x, y_<t) (`SideTokens.kl` summed);
    the margin as it is, and no KL, for the other methods."""
    kind = method(settings.loss_type).sequential_kl
    if kind == "none":
        return margin, None, None
    if chosen.kl is None or rejected.kl is None:
        raise ValueError("TDPO needs KL(π_ref ‖ π_θ) at each position (SideTokens.kl): run the policy with the "
                         "reference's distribution")
    kl_w, kl_l = chosen.sum(chosen.kl), rejected.sum(rejected.kl)
    if kind == "tdpo1":  # z = β[(m_w − m_l) − (D_l − D_w)]
        return margin - settings.beta * (kl_l - kl_w), kl_w, kl_l
    return margin - settings.beta * settings.tdpo_alpha * (kl_l - kl_w.detach()), kl_w, kl_l  # α, sg[D_w]


def without_gradient(kept_w: torch.Tensor, kept_l: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The pairs a token weighting leaves nothing to learn from: in the SimPO family, a side without a token kept
    zeroes the pair's loss; in the DPO family, both sides without one leave the margin 0 whatever the policy does
    (the regularizer of dpo_reg and wpo_reg still learns)."""
    if reference_free(loss_type):
        return ~(kept_w & kept_l)
    return ~(kept_w | kept_l) & (method(loss_type).regularizer == "none")


def margin_weights(chosen: SideTokens, rejected: SideTokens,
                   settings: LossSettings) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The token weights a_t of both sides: each side's own (`token_weights`), or OTPO's, which match the two."""
    if settings.weighting == "otpo":
        return otpo_weights(chosen, rejected, settings.otpo_epsilon, settings.otpo_reg_m)
    return token_weights(chosen, settings, True), token_weights(rejected, settings, False)


def otpo_weights(chosen: SideTokens, rejected: SideTokens, epsilon: float,
                 reg_m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OTPO's token weights (Mimasss2/OTPO, scripts/otpo_trainer.py: get_ot_weight), detached, [pairs, tokens] each.
    Per pair: the Euclidean cost between every chosen and every rejected token's final hidden state (+1e-6), divided
    by its largest entry when that is above 1 (the authors' matrix also holds the prompt's and padding's zero states,
    so the largest |h| of a token counts too); POT's stabilised unbalanced Sinkhorn with mass 1 on each token,
    entropic ε and marginal relaxation τ; a side's weights are its tokens' shares of the plan, scaled so that both
    sides sum to the shorter response's length."""
    import ot

    if chosen.hidden is None or rejected.hidden is None:
        raise ValueError("OTPO needs the policy's hidden states (SideTokens.hidden): run it with with_hidden=True")
    weights = (torch.zeros_like(chosen.logps), torch.zeros_like(rejected.logps))
    for pair in range(chosen.logps.shape[0]):
        states = [side.hidden[pair][side.mask[pair]].detach() for side in (chosen, rejected)]
        states = [h if h.dtype == torch.float64 else h.float() for h in states]
        cost = torch.cdist(*states, p=2) + 1e-6
        largest = torch.stack([cost.max(), *(h.norm(dim=-1).max() + 1e-6 for h in states)]).max()
        if largest > 1:
            cost = cost / largest
        mass = [torch.ones(len(h), dtype=cost.dtype, device=cost.device) for h in states]
        # reg_type "entropy": the authors' POT 0.9.4's default (later versions default to "kl", another plan)
        plan = ot.unbalanced.sinkhorn_unbalanced(*mass, cost, epsilon, reg_m, method="sinkhorn_stabilized",
                                                 reg_type="entropy")
        scale = plan.sum() / min(len(states[0]), len(states[1]))
        for side, values, side_weights in zip((chosen, rejected), (plan.sum(1), plan.sum(0)), weights):
            side_weights[pair][side.mask[pair]] = (values / scale).to(side_weights.dtype)
    return weights


def side_reward(side: SideTokens, settings: LossSettings,
                weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For one side of every pair, with its token weights a_t (None: every token 1): β Σ_t a_t x_t / N; the scale
    β / N that T-REG's regularizer uses; and, with weights, whether any token kept a weight (a positive total in
    the SimPO family, whose N it is; any weight not 0 in the DPO family), else None."""
    if reference_free(settings.loss_type):
        # r_S(y) = (β/N) Σ_t a_t log π_θ(y_t|x): reference-free, a (weighted) mean over tokens.
        if weights is None:
            scale = settings.beta / side.length
            return scale * side.sum(side.logps), scale, None
        total = side.sum(weights)
        scale = settings.beta / total.clamp(min=1e-12)
        return scale * side.sum(weights * side.logps), scale, total > 0
    scale = torch.full_like(side.length, settings.beta, dtype=side.logps.dtype)
    ratios = side.logps - side.ref_logps
    kept = None if weights is None else (weights != 0).any(-1)
    return settings.beta * side.sum(ratios if weights is None else weights * ratios), scale, kept


def wpo_weight(side: SideTokens) -> torch.Tensor:
    """WPO's weight of one response (Zhou et al. 2024, Eq. 2, the length-normalised "sampled alignment"
    form, as TRL's `use_weighting=True`): exp of the mean over its tokens of log π_θ(y_t) − log Σ_v π_θ(v)²,
    detached. Σ_v π_θ(v)² is the probability that two samples from π_θ agree, so the weight compares the
    response with what the policy would itself produce at each position."""
    if side.log_sum_sq_probs is None:
        raise ValueError("WPO needs log Σ_v π(v)² per position: run the policy with with_log_sum_sq=True")
    aligned = side.sum(side.logps.detach() - side.log_sum_sq_probs) / side.length
    return torch.exp(aligned)


def implicit_token_rewards(side: SideTokens, beta: float) -> torch.Tensor:
    """β · log π_θ/π_ref per token (docs/METHOD.md §1), zero off the mask."""
    return beta * (side.logps - side.ref_logps).detach() * side.mask


def token_reward_agreement(chosen: SideTokens, rejected: SideTokens, beta: float) -> torch.Tensor:
    """Pearson correlation between implicit token rewards and r̂ over all response tokens."""
    mask = torch.cat([chosen.mask.flatten(), rejected.mask.flatten()])
    implicit = torch.cat([implicit_token_rewards(chosen, beta).flatten(),
                          implicit_token_rewards(rejected, beta).flatten()])[mask]
    target = torch.cat([chosen.rewards.flatten(), rejected.rewards.flatten()])[mask]
    implicit, target = implicit.double() - implicit.double().mean(), target.double() - target.double().mean()
    denominator = implicit.norm() * target.norm()
    return (implicit @ target / denominator).float() if denominator > 0 else torch.zeros((), dtype=torch.float32)
