"""TDPO (`--loss tdpo1`, `tdpo2`) against a hand computation of its authors' formula
(Vance0124/Token-level-Direct-Preference-Optimization, trainers.py: `_tdpo_get_batch_logps`, `tdpo_loss`): on random
tensors in float64, on a real batch of the tiny model, and from the top-K a shard stores."""

import math

import pytest
import torch
import torch.nn.functional as F

from treg_core.forward import ExactReference, TopKReference, selected_token_logprobs
from treg_train.collate import scatter_tokens
from treg_train.losses import LossSettings, SideTokens, preference_loss


def official_tdpo(policy_logits, reference_logits, labels, pairs: int, beta: float, alpha: float, tdpo2: bool):
    """The authors' code, step by step: logits [2·pairs, T, V] of [chosen; rejected], labels with -100 off the
    response; the reference's log-probs as softmax().log(), KL(π_ref ‖ π_θ) per position, all summed over tokens."""
    labels = labels[:, 1:].clone()
    logits, reference_logits = policy_logits[:, :-1], reference_logits[:, :-1]
    mask = labels != -100
    labels[labels == -100] = 0
    vocab_logps = logits.log_softmax(-1)
    reference_vocab_ps = reference_logits.softmax(-1)
    reference_vocab_logps = reference_vocab_ps.log()
    per_position_kl = (reference_vocab_ps * (reference_vocab_logps - vocab_logps)).sum(-1)
    per_token_logps = torch.gather(vocab_logps, 2, labels.unsqueeze(2)).squeeze(2)
    per_reference_token_logps = torch.gather(reference_vocab_logps, 2, labels.unsqueeze(2)).squeeze(2)
    margin = ((per_token_logps - per_reference_token_logps) * mask).sum(-1)
    kl = (per_position_kl * mask).sum(-1)
    chosen_margin, rejected_margin, chosen_kl, rejected_kl = margin[:pairs], margin[pairs:], kl[:pairs], kl[pairs:]
    u = chosen_margin - rejected_margin
    z = u - alpha * (rejected_kl - chosen_kl.detach()) if tdpo2 else u - (rejected_kl - chosen_kl)
    return -F.logsigmoid(beta * z)


def _random_batch(seed: int, pairs: int = 4, prompt: int = 3, width: int = 9, vocab: int = 23, hidden: int = 6):
    """Hidden states and output layers of a policy and a reference, response lengths 1 to 6, one pair whose two
    responses are the same tokens, and labels as the authors' collator writes them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 4, 5, 3, 6, 4, 2])[: 2 * pairs]
    tokens = torch.randint(0, vocab, (2 * pairs, width), generator=g)
    tokens[pairs + 2] = tokens[2]  # pair 2: chosen and rejected alike
    lengths[pairs + 2] = lengths[2]
    labels = torch.full_like(tokens, -100)
    for row, length in enumerate(lengths):
        labels[row, prompt:prompt + length] = tokens[row, prompt:prompt + length]
    states = [torch.randn(2 * pairs, width, hidden, generator=g, dtype=torch.float64) for _ in range(2)]
    for s in states:
        s[pairs + 2] = s[2]
    heads = [torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    return tokens, labels, lengths, states, heads


def _treg_sides(states, heads, tokens, labels, lengths, reference_kind="exact", k=None):
    """treg's path: the states at the positions that predict a response token, its chunked kernel (3 rows a chunk),
    the per-token values scattered to [rows, longest] and split into chosen and rejected."""
    rows, width = labels.shape
    predict = (labels[:, 1:] != -100)
    flat_index = (torch.arange(rows)[:, None] * width + torch.arange(width - 1)[None])[predict]
    targets = labels[:, 1:][predict]
    policy_h, reference_h = (s.reshape(rows * width, -1)[flat_index] for s in states)
    reference_logps_all = torch.log_softmax(reference_h @ heads[1].detach().T, -1)
    if reference_kind == "exact":
        reference = ExactReference(reference_h, heads[1].detach())
    else:
        top = reference_logps_all.topk(k, dim=-1)
        reference = TopKReference(top.indices, top.values)
    out = selected_token_logprobs(policy_h, lambda h: h @ heads[0].T, targets, chunk_rows=3, reference=reference)
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    ref_token = reference_logps_all.gather(-1, targets[:, None]).squeeze(-1)
    values = [scatter_tokens(v, mask) for v in (out.logps, ref_token, out.kl)]
    pairs = rows // 2
    return [SideTokens(values[0][r], values[1][r], torch.zeros_like(values[0][r]), mask[r], kl=values[2][r])
            for r in (slice(0, pairs), slice(pairs, rows))]


@pytest.mark.parametrize("loss", ["tdpo1", "tdpo2"])
def test_tdpo_matches_the_official_formula_in_float64(loss):
    tokens, labels, lengths, states, heads = _random_batch(seed=0)
    official = official_tdpo(states[0] @ heads[0].T, states[1] @ heads[1].T, labels, 4, 0.1, 0.5, loss == "tdpo2")
    ours, metrics = preference_loss(*_treg_sides(states, heads, tokens, labels, lengths),
                                    LossSettings(loss, beta=0.1, tdpo_alpha=0.5))
    assert torch.allclose(ours, official, rtol=1e-12, atol=0)
    assert ours[2].item() == pytest.approx(math.log(2), abs=1e-12)  # margin 0
    (grad_official,) = torch.autograd.grad(official.sum(), heads[0])
    (grad_ours,) = torch.autograd.grad(ours.sum(), heads[0])
    assert torch.allclose(grad_ours, grad_official, rtol=1e-10, atol=1e-14)
    assert (metrics["kl/chosen"] > 0).all() and (metrics["kl/rejected"] > 0).all()


def test_the_kl_is_zero_against_itself_and_the_top_k_bound_is_exact_with_the_whole_vocabulary():
    tokens, labels, lengths, states, heads = _random_batch(seed=1)
    same = _treg_sides([states[0], states[0]], [heads[0], heads[0]], tokens, labels, lengths)
    assert torch.allclose(same[0].kl[same[0].mask], torch.zeros(()).double(), atol=1e-12)
    exact = _treg_sides(states, heads, tokens, labels, lengths)
    whole = _treg_sides(states, heads, tokens, labels, lengths, "topk", k=23)
    assert torch.allclose(whole[0].kl, exact[0].kl, atol=1e-10)
    for k in (1, 5, 12):
        bound = _treg_sides(states, heads, tokens, labels, lengths, "topk", k=k)
        for ours, truth in zip(bound, exact):
            assert (ours.kl[ours.mask] >= -1e-12).all() and (ours.kl[ours.mask] <= truth.kl[truth.mask] + 1e-12).all()


def test_the_exact_path_matches_the_official_formula_on_a_real_batch(tiny_model, learnable_shards, tmp_path):
    """Through treg's Objective (the policy's kernel with the reference's distribution beside it) on pairs of the
    tiny model's shards, against the official formula on each model's full logits, in float32."""
    from helpers import perturbed_copy
    from transformers import AutoModelForCausalLM

    from treg_core.forward import TokenLogprobs
    from treg_train.collate import collate
    from treg_train.index import Reading, ShardIndex
    from treg_train.readers import EvalReader
    from treg_train.step import Objective

    reader = EvalReader(ShardIndex(learnable_shards, Reading()))
    pairs = [reader.read(0, row) for row in range(5)]
    batch = collate(pairs, padding_free=True)
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for path in (tiny_model, perturbed_copy(tiny_model, tmp_path / "reference", seed=3, scale=0.05))]
    for loss in ("tdpo1", "tdpo2"):
        objective = Objective(TokenLogprobs(models[0], chunk_rows=7), TokenLogprobs(models[1], chunk_rows=7),
                              LossSettings(loss, beta=0.1, tdpo_alpha=0.5))
        ours, _ = objective.losses(batch)
        for n, pair in enumerate(pairs):
            sequences = [torch.cat([torch.as_tensor(pair.prompt_ids), torch.as_tensor(r)]).long()
                         for r in (pair.chosen_ids, pair.rejected_ids)]
            width = max(len(s) for s in sequences)
            tokens = torch.stack([F.pad(s, (0, width - len(s))) for s in sequences])
            labels = torch.full_like(tokens, -100)
            for row, s in enumerate(sequences):
                labels[row, len(pair.prompt_ids):len(s)] = s[len(pair.prompt_ids):]
            with torch.no_grad():
                logits = [model(tokens).logits.double() for model in models]
            official = official_tdpo(*logits, labels, 1, 0.1, 0.5, loss == "tdpo2")
            assert ours[n].item() == pytest.approx(official.item(), rel=1e-5, abs=1e-6)


def test_tdpo_without_a_reference_in_memory_needs_the_top_k_in_the_shards(tiny_model, learnable_shards, tmp_path):
    from helpers import assert_one_line_error, run, train_command

    result = run(train_command("--model", tiny_model, "--data", learnable_shards, "--output", tmp_path / "run",
                               "--loss", "tdpo2", "--max-steps", "1", "--global-batch-size", "4"))
    assert_one_line_error(result, "ref_topk_ids", "--ref-topk")


def test_tdpo2_trains_with_the_reference_in_memory_on_two_processes(tiny_model, learnable_shards, tmp_path):
    """Real FSDP2 on two processes: the reference's decoder sharded, its output layer whole on each rank."""
    from helpers import perturbed_copy, read_metrics, run, train_command

    reference = perturbed_copy(tiny_model, tmp_path / "reference", seed=4, scale=0.05)
    result = run(train_command("--model", tiny_model, "--ref-model", reference, "--data", learnable_shards,
                               "--output", tmp_path / "run", "--loss", "tdpo2", "--max-steps", "2",
                               "--global-batch-size", "4", "--logging-steps", "1", "--learning-rate", "1e-4",
                               processes=2))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in read_metrics(tmp_path / "run") if "kl/chosen" in line]
    assert len(lines) == 2 and all(line["kl/chosen"] > 0 and math.isfinite(line["loss"]) for line in lines)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_tdpo2_trains_on_the_top_k_its_shards_store(tiny_model, tmp_path):
    """treg-score --ref-topk, then treg-train --loss tdpo2 without a reference in memory: the KL from the shards."""
    from helpers import hf_score_config, make_learnable_pairs, read_metrics, run, train_command, write_jsonl

    from treg_data import pipeline

    data = write_jsonl(tmp_path / "pairs.jsonl", make_learnable_pairs(8))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", ref_topk=5))
    result = run(train_command("--model", tiny_model, "--data", tmp_path / "scored", "--output", tmp_path / "run",
                               "--loss", "tdpo2", "--max-steps", "2", "--global-batch-size", "4", "--logging-steps",
                               "1", "--learning-rate", "1e-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in read_metrics(tmp_path / "run") if "kl/chosen" in line]
    assert len(lines) == 2 and lines[0]["kl/chosen"] == pytest.approx(0, abs=1e-6)  # the policy is the reference
    assert lines[1]["kl/chosen"] > 1e-6  # after an update it is not


def test_a_reference_of_another_output_width_is_refused_and_one_beside_top_k_shards_says_it_wins(tiny_model, tmp_path):
    """One tokenizer on output layers of two widths passes the vocabulary check, but the exact KL compares the two
    distributions token by token: refused in one line before any model loads. A reference of the policy's width over
    shards that store a top-K too: the run says which of the two its KL comes from."""
    import json
    import shutil

    from helpers import assert_one_line_error, hf_score_config, make_learnable_pairs, run, train_command, write_jsonl

    from treg_data import pipeline

    data = write_jsonl(tmp_path / "pairs.jsonl", make_learnable_pairs(4))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", ref_topk=2))
    wide = shutil.copytree(tiny_model, tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    common = ("--model", tiny_model, "--data", tmp_path / "scored", "--loss", "tdpo1", "--max-steps", "1",
              "--global-batch-size", "4")
    refused = run(train_command(*common, "--output", tmp_path / "refused", "--ref-model", wide))
    assert_one_line_error(refused, "output layers of 512 and 576 tokens", "--ref-topk")
    result = run(train_command(*common, "--output", tmp_path / "run", "--ref-model", tiny_model))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gives TDPO's KL exactly" in result.stderr and "top-2 tokens the shards" in result.stderr
