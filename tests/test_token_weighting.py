"""The token-weighted margin: the objectives from before it are unchanged bit for bit, and D²PO, ConfPO, TGDPO,
TIS-DPO, SePO and WPO's official weight equal a hand computation of their authors' code (`LotuSrc/D2PO`
trainer_utils.py get_batch_logps; `hee-suk-yoon/ConfPO` cpo_trainer.py cpo_loss_confpo; `dvlab-research/TGDPO`
train/tgdpo/trainer.py; `exlaw/TIS-DPO` preference_datasets.py rank_based_transform and trainers.py tisdpo_loss;
`SteveKGYang/SePO` token_score.py get_topK and utils_selective.py; `wzhouad/WPO` run_wpo.py), on random tensors
and on one real batch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error, read_metrics, run, train_command

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


def with_signal(sides, seed: int, quantum: float = 0.0):
    """The sides with a random token signal s_t; rounded to multiples of `quantum` (ties) when given."""
    generator = torch.Generator().manual_seed(seed)
    for side in sides:
        signal = torch.randn(side.logps.shape, generator=generator, dtype=side.logps.dtype)
        side.signal = (torch.round(signal / quantum) * quantum if quantum else signal) * side.mask
    return sides


def log1p_exp(x: float) -> float:
    """−log σ(−x), computed as the authors' F.logsigmoid does for both signs."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def lengths(side, pair) -> int:
    return int(side.mask[pair].sum())


def values(side, tensor, pair) -> list[float]:
    return [float(v) for v in tensor[pair, : lengths(side, pair)]]


def tgdpo_by_hand(chosen, rejected, beta, alpha):
    """dvlab-research/TGDPO: −log σ(Σ_t β(1 + αβ r_t) ρ^w_t − Σ_t β(1 − αβ r_t) ρ^l_t), r = log π_dpo − log π_ref,
    ρ = log π_θ − log π_ref, summed over the response tokens."""
    losses = []
    for pair in range(chosen.logps.shape[0]):
        margin = 0.0
        for side, sign in ((chosen, 1), (rejected, -1)):
            for p, r, s in zip(values(side, side.logps, pair), values(side, side.ref_logps, pair),
                               values(side, side.signal, pair)):
                margin += sign * beta * (1 + sign * alpha * beta * s) * (p - r)
        losses.append(log1p_exp(-margin))
    return np.array(losses)


def rank_based_transform(nums: list[float], low: float = 0.7, high: float = 1.3) -> list[float]:
    """exlaw/TIS-DPO's rank_based_transform: ascending ranks by a stable sort, mapped linearly to [low, high]."""
    if len(nums) == 1:
        return [1.0]
    result = [0.0] * len(nums)
    for rank, index in enumerate(sorted(range(len(nums)), key=lambda k: nums[k])):
        result[index] = low + rank / (len(nums) - 1) * (high - low)
    return result


def tis_dpo_by_hand(chosen, rejected, beta):
    """exlaw/TIS-DPO: the weights file stores round(log p_bad − log p_good, 2) for every response token but the
    appended EOS; chosen ranks their negation, rejected the stored values; the EOS weighs 0. Then
    −log σ(β(Σ_t w^w_t ρ^w_t − Σ_t w^l_t ρ^l_t))."""
    losses = []
    for pair in range(chosen.logps.shape[0]):
        margin = 0.0
        for side, negate in ((chosen, True), (rejected, False)):
            stored = [round(-s, 2) for s in values(side, side.signal, pair)[:-1]]  # s = log p_good − log p_bad
            weights = (rank_based_transform([-v if negate else v for v in stored]) if stored else []) + [0.0]
            ratios = [p - r for p, r in zip(values(side, side.logps, pair), values(side, side.ref_logps, pair))]
            margin += (1 if negate else -1) * sum(w * x for w, x in zip(weights, ratios))
        losses.append(log1p_exp(-beta * margin))
    return np.array(losses)


def sepo_by_hand(chosen, rejected, ratio):
    """SteveKGYang/SePO: per response of L tokens, scores for tokens 1..L−1 (the first is never scored);
    int(ratio·(L − 1)) picks by repeated argmax (chosen) or argmin (rejected), the earliest of ties first; then
    −log σ(mean log π_θ over chosen's picks − mean over rejected's). A side with no pick: the pair gives 0."""
    losses = []
    for pair in range(chosen.logps.shape[0]):
        means = []
        for side, pick in ((chosen, max), (rejected, min)):
            scores = values(side, side.signal, pair)[1:]
            remaining, picked = list(range(len(scores))), []
            for _ in range(int(ratio * len(scores))):
                best = pick(scores[i] for i in remaining)
                first = next(i for i in remaining if scores[i] == best)
                picked.append(first + 1)
                remaining.remove(first)
            logps = values(side, side.logps, pair)
            means.append(sum(logps[t] for t in picked) / len(picked) if picked else None)
        losses.append(0.0 if None in means else log1p_exp(-(means[0] - means[1])))
    return np.array(losses)


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


def test_tgdpo_is_its_authors_formula():
    chosen, rejected = with_signal(random_sides(7, pairs=8, tokens=12), seed=7)
    got, _ = preference_loss(chosen, rejected, LossSettings("tgdpo", beta=0.1, tgdpo_alpha=0.5, weighting="tgdpo"))
    np.testing.assert_allclose(got.numpy(), tgdpo_by_hand(chosen, rejected, 0.1, 0.5), rtol=1e-12)


@pytest.mark.parametrize("quantum", [0.0, 0.05])
def test_tis_dpo_is_its_authors_formula_ties_included(quantum):
    chosen, rejected = with_signal(random_sides(8, pairs=10, tokens=12), seed=8, quantum=quantum)
    chosen.mask[0], rejected.mask[1] = torch.arange(12) < 2, torch.arange(12) < 1  # one ranked token; EOS only
    got, _ = preference_loss(chosen, rejected, LossSettings("tis_dpo", beta=0.1, weighting="tis_dpo"))
    np.testing.assert_allclose(got.numpy(), tis_dpo_by_hand(chosen, rejected, 0.1), rtol=1e-12)


def test_tis_dpo_weights_rank_within_each_response_from_0_7_to_1_3():
    from treg_train.losses import tis_dpo_rank_weights

    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    keys = torch.tensor([[0.3, -1.0, 2.0, 0.1, 9.0], [5.0, -5.0, 7.0, 0.0, 0.0]])
    weights = tis_dpo_rank_weights(keys, mask)
    torch.testing.assert_close(weights.float(), torch.tensor([[1.1, 0.7, 1.3, 0.9, 0.0], [1.3, 0.7, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("quantum", [0.0, 0.5])
def test_sepo_is_its_authors_formula_ties_included(quantum):
    chosen, rejected = with_signal(random_sides(9, pairs=10, tokens=14), seed=9, quantum=quantum)
    chosen.mask[0] = torch.arange(14) < 3  # ⌊0.3 · 2⌋ = 0 tokens: the pair contributes nothing
    got, _ = preference_loss(chosen, rejected, LossSettings("sepo", beta=1.0, gamma=0.0, weighting="sepo"))
    want = sepo_by_hand(chosen, rejected, 0.3)
    assert want[0] == 0 and got[0] == 0 and (want > 0).sum() >= 5
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_the_shard_signal_reaches_the_weights_detached():
    chosen, rejected = with_signal(random_sides(10), seed=10)
    for side in (chosen, rejected):
        side.logps.requires_grad_(True)
        side.signal.requires_grad_(True)
    for method in ("tgdpo", "tis_dpo", "sepo"):
        loss, _ = preference_loss(chosen, rejected, LossSettings(method, beta=0.1, weighting=method))
        loss.sum().backward()
        assert chosen.signal.grad is None and chosen.logps.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the shards' token signal"):
        chosen.signal = None
        preference_loss(chosen, rejected, LossSettings("tgdpo", weighting="tgdpo"))


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
    # The signal of TIS-DPO with T-REG's prompts as its contrastive pair, read from the shards; it stands in for
    # a DPO model's log-ratio for TGDPO and SePO, whose formulas do not depend on where s_t comes from.
    chosen, rejected = perturbed_policy_logps(tiny_model, learnable_shards, pairs=6,
                                              signal=("better_logps", "worse_logps"))
    # SePO at k = 0.5: the rejected answers here are a few tokens long, too short for 30% to pick one.
    for method, by_hand in (("tgdpo", lambda w, r: tgdpo_by_hand(w, r, 0.1, 0.5)),
                            ("tis_dpo", lambda w, r: tis_dpo_by_hand(w, r, 0.1)),
                            ("sepo", lambda w, r: sepo_by_hand(w, r, 0.5))):
        got, _ = preference_loss(chosen, rejected, LossSettings(method, beta=1.0 if method == "sepo" else 0.1,
                                                                weighting=method, sepo_ratio=0.5))
        want = by_hand(chosen, rejected)
        assert (want > 0).all(), method
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, err_msg=method)


def _train(tiny_model, shards, output, *args):
    return run(train_command("--model", tiny_model, "--data", shards, "--output", output, "--global-batch-size", "8",
                             "--max-steps", "2", "--logging-steps", "1", "--save-steps", "0", *args))


@pytest.mark.slow
def test_the_new_objectives_train_and_refuse_a_mixed_weighting(tiny_model, learnable_shards, tmp_path):
    for loss in ("d2po", "confpo", "tis_dpo"):  # tis_dpo's default pair: T-REG's prompts, in every shard
        result = _train(tiny_model, learnable_shards, tmp_path / loss, "--loss", loss)
        assert result.returncode == 0, result.stderr[-2000:]
        assert all(math.isfinite(m["loss"]) for m in read_metrics(tmp_path / loss))
    result = _train(tiny_model, learnable_shards, tmp_path / "mixed", "--loss", "d2po", "--token-weighting", "confpo")
    assert result.returncode == 2 and "weights tokens its own way" in result.stderr
    result = _train(tiny_model, learnable_shards, tmp_path / "no-dpo", "--loss", "tgdpo")
    assert_one_line_error(result, "chosen_dpo_logps", "treg-score writes them with --dpo-model")


@pytest.mark.slow
def test_swap_pairs_trains_on_the_reversed_preference(tiny_model, learnable_shards, tmp_path):
    """The first step's metrics come before any update: swapped, chosen's are the plain run's rejected's."""
    first = {}
    for name, extra in (("plain", []), ("swapped", ["--swap-pairs"])):
        result = _train(tiny_model, learnable_shards, tmp_path / name, "--loss", "dpo", "--max-steps", "1", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        first[name] = read_metrics(tmp_path / name)[0]
    assert first["swapped"]["logps/chosen"] == pytest.approx(first["plain"]["logps/rejected"], rel=1e-5)
    assert first["swapped"]["logps/rejected"] == pytest.approx(first["plain"]["logps/chosen"], rel=1e-5)


# ---- a token signal that is 0 on every token: said at scoring, refused at training --------------------------


@pytest.fixture(scope="module")
def self_scored(tiny_model, tmp_path_factory):
    """Pairs scored by treg-score with the policy itself as --dpo-model and --reverse-dpo-model ("itself"), and with a
    copy of it under another name as --dpo-model ("copy"): each folder, with the warnings its scoring printed."""
    import contextlib
    import io
    import shutil

    from helpers import hf_score_config, make_pairs, write_jsonl

    from treg_data.cli import score

    root = tmp_path_factory.mktemp("self-scored")
    data = write_jsonl(root / "pairs.jsonl", make_pairs(8))
    copy = str(shutil.copytree(tiny_model, root / "policy-copy"))
    scored = {}
    for name, models in (("itself", {"dpo_model": tiny_model, "reverse_dpo_model": tiny_model}),
                         ("copy", {"dpo_model": copy})):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            score(hf_score_config(tiny_model, data, root / name, **models))
        scored[name] = root / name, [line for line in stderr.getvalue().splitlines()
                                     if line.startswith("treg-score: warning:")]
    return scored


@pytest.mark.slow
def test_a_signal_of_one_model_against_itself_is_said_before_scoring_and_refused_at_training(tiny_model, self_scored,
                                                                                             tmp_path):
    from treg_core.errors import UserError
    from treg_train.index import Reading, ShardIndex

    folder, warnings = self_scored["itself"]
    assert len(warnings) == 2, warnings  # one per signal, from the settings; not again once the shards show it
    assert "--model and --dpo-model are one model" in warnings[0]
    assert "*_dpo_rewards and the token signal *_dpo_logps - *_ref_logps" in warnings[0]
    assert "will be 0 on every token; give a DPO-trained model as --dpo-model" in warnings[0]
    assert "--dpo-model and --reverse-dpo-model are one model" in warnings[1]
    assert "as --reverse-dpo-model, not the --dpo-model" in warnings[1]
    for first, second in (("dpo_logps", "ref_logps"), ("dpo_logps", "rev_dpo_logps")):
        with pytest.raises(UserError, match=f"{folder}: \\*_{first} - \\*_{second}, the token signal this weighting "
                                            f"reads, is 0 on every token \\(both are log-probs of {tiny_model}\\)"):
            ShardIndex(str(folder), Reading(signal=(first, second)))
    assert ShardIndex(str(folder), Reading(signal=("better_logps", "worse_logps"))).num_pairs == 8
    result = _train(tiny_model, folder, tmp_path / "tgdpo", "--loss", "tgdpo")
    assert_one_line_error(result, f"{folder}: *_dpo_logps - *_ref_logps", "is 0 on every token",
                          "score the data again with a DPO-trained model as --dpo-model")


def test_a_signal_every_shard_records_as_zero_is_said_after_scoring_and_refused_unless_a_shard_lacks_the_record(
        self_scored, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from treg_core.contract import SIGNALS_KEY
    from treg_core.errors import UserError
    from treg_train.index import Reading, ShardIndex

    folder, warnings = self_scored["copy"]  # another name: only the scores show that the two models are one
    assert len(warnings) == 1 and f"*_dpo_logps equals *_ref_logps on every token in {folder}" in warnings[0]
    signal = Reading(signal=("dpo_logps", "ref_logps"))
    with pytest.raises(UserError, match="is 0 on every token \\(as every shard records\\); score the data again"):
        ShardIndex(str(folder), signal)
    unrecorded = shutil.copytree(folder, tmp_path / "unrecorded")  # as if one shard were written before the record
    shard = sorted((unrecorded / "data").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.replace_schema_metadata({key: value for key, value in table.schema.metadata.items()
                                                  if key != SIGNALS_KEY}), shard)
    assert ShardIndex(str(unrecorded), signal).num_pairs == 8
