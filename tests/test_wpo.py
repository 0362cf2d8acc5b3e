"""WPO and WPO + T-REG: the weight by hand, the kernel's statistic against a full softmax, the loss
against TRL's DPOTrainer with use_weighting=True (treg's --no-wpo-clamp-weight), and a real run at
initialisation. The official, clamped weight is tested in test_token_weighting.py."""

import math

import numpy as np
import pytest
import torch
from helpers import read_metrics, run, train_command

from treg_core.forward import TokenLogprobs
from treg_train.collate import collate, scatter_tokens
from treg_train.index import TrainingPair
from treg_train.losses import LossSettings, SideTokens, preference_loss


def _side(logps, ref, log_sum_sq, rewards=None):
    logps = torch.tensor(logps, dtype=torch.float64)
    mask = torch.ones_like(logps, dtype=torch.bool)
    rewards = torch.zeros_like(logps) if rewards is None else torch.tensor(rewards, dtype=torch.float64)
    return SideTokens(logps, torch.tensor(ref, dtype=torch.float64), rewards, mask,
                      torch.tensor(log_sum_sq, dtype=torch.float64))


def test_wpo_and_wpo_reg_by_hand():
    chosen = _side([[-1.0, -2.0]], [[-1.5, -2.5]], [[-0.5, -1.0]], rewards=[[0.2, -0.1]])
    rejected = _side([[-3.0, -1.0, -2.0]], [[-2.0, -1.0, -2.5]], [[-0.7, -0.2, -0.9]], rewards=[[-0.3, 0.1, 0.0]])
    beta, alpha = 0.1, 0.25
    omega_w = math.exp(((-1.0 + 0.5) + (-2.0 + 1.0)) / 2)
    omega_l = math.exp(((-3.0 + 0.7) + (-1.0 + 0.2) + (-2.0 + 0.9)) / 3)
    margin = beta * ((-1.0 + 1.5) + (-2.0 + 2.5)) - beta * ((-3.0 + 2.0) + 0.0 + (-2.0 + 2.5))
    dpo = math.log1p(math.exp(-margin))
    loss, metrics = preference_loss(chosen, rejected, LossSettings("wpo", beta=beta))
    assert float(loss) == pytest.approx(omega_w * omega_l * dpo, rel=1e-12)
    assert float(metrics["wpo_weight"]) == pytest.approx(omega_w * omega_l, rel=1e-12)

    w = 1 / (1 + math.exp(margin))  # the DPO pair weight, as in dpo_reg
    reg = -beta * (0.2 * -1.0 + -0.1 * -2.0) - beta * (-0.3 * -3.0 + 0.1 * -1.0)
    loss, _ = preference_loss(chosen, rejected, LossSettings("wpo_reg", beta=beta, alpha=alpha))
    assert float(loss) == pytest.approx(omega_w * omega_l * dpo + alpha * w * reg, rel=1e-12)


def test_the_wpo_weight_carries_no_gradient():
    def gradient(loss_type):
        chosen = _side([[-1.0, -2.0]], [[-1.5, -2.5]], [[-0.5, -1.0]])
        rejected = _side([[-3.0, -1.0]], [[-2.0, -1.0]], [[-0.7, -0.2]])
        chosen.logps.requires_grad_(True)
        loss, metrics = preference_loss(chosen, rejected, LossSettings(loss_type, beta=0.1))
        loss.sum().backward()
        return chosen.logps.grad, metrics

    wpo, metrics = gradient("wpo")
    dpo, _ = gradient("dpo")
    assert torch.allclose(wpo, metrics["wpo_weight"] * dpo, rtol=1e-12)  # ω scales the DPO gradient, nothing more


def test_the_kernel_statistic_is_log_sum_of_squared_probabilities(tiny_model):
    from transformers import AutoModelForCausalLM

    model = TokenLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), chunk_rows=3).eval()
    input_ids = torch.randint(5, 200, (1, 12))
    positions = torch.arange(4, 11)
    with torch.no_grad():
        logps, log_sum_sq, *_ = model(input_ids, torch.arange(12)[None], positions, input_ids[0, positions + 1],
                                      with_log_sum_sq=True)
        full = torch.log_softmax(model.lm(input_ids).logits[0].double(), dim=-1)[positions]
    assert logps.double().numpy() == pytest.approx(full.gather(-1, input_ids[0, positions + 1][:, None])[:, 0].numpy(),
                                                   abs=1e-5)
    assert log_sum_sq.double().numpy() == pytest.approx(torch.logsumexp(2 * full, dim=-1).numpy(), abs=1e-5)


# ---- against TRL's DPOTrainer(use_weighting=True) -------------------------------------------------


def _trl_trainer(policy, reference, tokenizer, rows, tmp_path, weighting: bool, batch: int):
    import datasets
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=batch, beta=0.1,
                       use_weighting=weighting, max_length=512, report_to="none", use_cpu=True, seed=0, bf16=False,
                       dataloader_num_workers=0)
    return DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                      train_dataset=datasets.Dataset.from_list(rows))


def _trl_loss(trainer, example) -> float:
    batch = trainer.data_collator([example])
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def _perturbed_policy(tiny_model):
    """A policy that has moved away from the reference, the same every time it is built."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy


def test_wpo_matches_trl_use_weighting(tiny_model, tmp_path):
    from helpers import make_learnable_pairs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in make_learnable_pairs(8)]
    trainers = {weighting: _trl_trainer(_perturbed_policy(tiny_model),
                                        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                        tokenizer, rows, tmp_path / str(weighting), weighting, batch=1)
                for weighting in (True, False)}  # TRL patches the models it is given: one pair each
    examples = list(trainers[True].train_dataset)
    trl_losses = np.array([_trl_loss(trainers[True], e) for e in examples])
    trl_weights = trl_losses / np.array([_trl_loss(trainers[False], e) for e in examples])

    pairs = [TrainingPair(id=str(i), prompt_ids=np.array(e["prompt_ids"]), chosen_ids=np.array(e["chosen_ids"]),
                          rejected_ids=np.array(e["rejected_ids"]), chosen_ref_logps=None, rejected_ref_logps=None,
                          chosen_rewards=np.zeros(len(e["chosen_ids"])),
                          rejected_rewards=np.zeros(len(e["rejected_ids"])))
             for i, e in enumerate(examples)]
    inputs = collate(pairs, padding_free=False)
    args = (inputs.input_ids, inputs.position_ids, inputs.predict_index, inputs.targets)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        logps, log_sum_sq, *_ = TokenLogprobs(_perturbed_policy(tiny_model)).eval()(*args, with_log_sum_sq=True)
        ref_logps = TokenLogprobs(reference).eval()(*args).logps
    logps, log_sum_sq, ref_logps = (scatter_tokens(t, inputs.token_mask) for t in (logps, log_sum_sq, ref_logps))
    n = len(pairs)
    sides = [SideTokens(logps[r], ref_logps[r], inputs.rewards[r], inputs.token_mask[r], log_sum_sq[r])
             for r in (slice(0, n), slice(n, 2 * n))]
    losses, metrics = preference_loss(*sides, LossSettings("wpo", beta=0.1, wpo_clamp=False))  # TRL's form
    assert np.abs(trl_weights - 1).max() > 1e-3  # the weights are not trivially one
    assert metrics["wpo_weight"].numpy() == pytest.approx(trl_weights, abs=1e-5)
    assert losses.numpy() == pytest.approx(trl_losses, abs=1e-5)


# ---- a real run --------------------------------------------------------------------------------


def test_wpo_at_initialisation_is_the_weighted_ln2(tiny_model, learnable_shards, tmp_path):
    """With policy = reference every DPO margin is 0, so the first logged loss is mean(min(1, ω_w·ω_l))·ln 2,
    with ω computed here from a plain transformers forward over all pairs of the one global batch."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    rows = pq.read_table(f"{learnable_shards}/data").to_pylist()
    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               "--loss", "wpo", "--global-batch-size", str(len(rows)), "--max-steps", "1",
                               "--logging-steps", "1", "--max-length", "256", "--micro-batch-tokens", "4096",
                               "--save-steps", "0", "--beta", "0.1"))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = read_metrics(tmp_path / "run")[0]

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()

    def omega(prompt_ids, response_ids) -> float:
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0], dim=-1)[len(prompt_ids) - 1:-1]
        chosen = logp.gather(-1, torch.tensor(response_ids)[:, None])[:, 0]
        return math.exp(float((chosen - torch.logsumexp(2 * logp, dim=-1)).mean()))

    # WPO's official weight, treg's default: the product clamped at 1
    weights = [min(1.0, omega(r["prompt_ids"], r["chosen_ids"]) * omega(r["prompt_ids"], r["rejected_ids"]))
               for r in rows]
    assert logged["wpo_weight"] == pytest.approx(np.mean(weights), rel=1e-4)
    assert logged["loss"] == pytest.approx(np.mean(weights) * math.log(2), rel=1e-4)
