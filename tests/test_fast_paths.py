"""Each path that makes training or scoring faster on a GPU computes the numbers of the plain path: packed
varlen attention (its CPU path, the reference its CUDA kernel is checked against), flex attention over packs
rounded to a few lengths (forward only: flex has no backward on a CPU), the packed transformers scorer,
fused AdamW. Regional compilation and selective checkpointing are run end to end in test_train_e2e.py;
Liger's kernels need CUDA and are refused here with one line."""

import copy
import subprocess

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, make_training_pair, train_command

from treg_core.attention import VARLEN, register
from treg_core.forward import TokenLogprobs, packed, response_positions, right_padded
from treg_train.collate import collate
from treg_train.step import Batching, pack_lengths


def _model(path, attention: str | None):
    from transformers import AutoModelForCausalLM

    if attention == VARLEN:
        register()
    options = {"attn_implementation": attention} if attention else {}
    return TokenLogprobs(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options))


def _sequences(seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(3, 400, n) for n in (37, 90, 12, 64, 2)]
    prompts = [5, 30, 4, 20, 1]
    targets = torch.from_numpy(np.concatenate([s[p:] for s, p in zip(sequences, prompts)]))
    return sequences, prompts, targets


def _forward(model, sequences, prompts, targets, packs: bool, pack_to=None):
    responses = [len(s) - p for s, p in zip(sequences, prompts)]
    if packs:
        input_ids, position_ids = packed(sequences, pack_to)
        starts = np.concatenate([[0], np.cumsum([len(s) for s in sequences])[:-1]])
    else:
        input_ids, position_ids = right_padded(sequences)
        starts = np.arange(len(sequences)) * input_ids.shape[1]
    return model(input_ids, position_ids, response_positions(starts, prompts, responses), targets).logps


def test_packed_varlen_attention_gives_the_padded_log_probs_and_gradients(tiny_model):
    sequences, prompts, targets = _sequences()
    padded, varlen = _model(tiny_model, None), _model(tiny_model, VARLEN)
    varlen.load_state_dict(copy.deepcopy(padded.state_dict()))
    results = {}
    for name, model, packs in (("padded", padded, False), ("varlen", varlen, True)):
        logps = _forward(model, sequences, prompts, targets, packs)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        results[name] = logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results["varlen"][0], results["padded"][0], atol=1e-5, rtol=0)
    for name, grad in results["padded"][1].items():
        torch.testing.assert_close(results["varlen"][1][name], grad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_flex_attention_over_packs_rounded_up_gives_the_padded_log_probs(tiny_model):
    sequences, prompts, targets = _sequences(1)
    padded, flex = _model(tiny_model, None).eval(), _model(tiny_model, "flex_attention").eval()
    with torch.no_grad():
        want = _forward(padded, sequences, prompts, targets, packs=False)
        for pack_to in (256, 384):  # two of the pack lengths: a filler sequence makes up the difference
            got = _forward(flex, sequences, prompts, targets, packs=True, pack_to=pack_to)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_packs_are_rounded_up_to_a_few_lengths_and_the_filler_is_never_read():
    assert pack_lengths(16384) == (4096, 8192, 12288, 16384)
    assert pack_lengths(1000) == (256, 512, 768, 1024)
    pairs = [make_training_pair(prompt=7, chosen=30, rejected=9), make_training_pair(prompt=3, chosen=4, rejected=50)]
    batching = Batching(max_length=512, micro_batch_tokens=1000, padding_free=True, device=torch.device("cpu"),
                        pack_lengths=pack_lengths(1000))
    inputs = batching.inputs(pairs)
    plain = collate(pairs, padding_free=True)
    assert inputs.input_ids.shape == (1, 256) and plain.input_ids.shape == (1, inputs.num_tokens)
    assert torch.equal(inputs.predict_index, plain.predict_index)
    assert int(inputs.predict_index.max()) < inputs.num_tokens
    assert inputs.position_ids[0, inputs.num_tokens] == 0  # the filler is a sequence of its own
    assert batching.packs_seen == {256}


def test_the_packed_transformers_scorer_gives_the_padded_scores(tiny_model, monkeypatch):
    from treg_data.scorers import EngineOptions, hf_scorer

    sequences, prompts, _ = _sequences(2)
    requests = [(s[:p].tolist(), s[p:].tolist()) for s, p in zip(sequences, prompts)]
    options = EngineOptions(model=tiny_model, dtype="float32", batch_tokens=150)
    packs = hf_scorer.HFScorer(options)  # the default: varlen where the model allows it
    monkeypatch.setattr(hf_scorer, "default_attention", lambda *args: (None, "the model's own"))
    padded = hf_scorer.HFScorer(options)
    assert packs.packed and not padded.packed and packs.scoring_path.endswith("packed")
    for got, want in zip(packs.score(requests), padded.score(requests), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_fused_adamw_takes_the_same_steps():
    from treg_train.config import TrainConfig
    from treg_train.train import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Linear(16, 8) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    settings = TrainConfig(learning_rate=1e-2, weight_decay=0.1, warmup_ratio=0.0)
    optimizers = [build_optimizer(settings, model, 10, fused=fused)[0] for model, fused in zip(models, (False, True))]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    for step in range(3):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip(models, optimizers):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_liger_kernels_off_cuda_are_one_line(tiny_model, learnable_shards, tmp_path):
    result = subprocess.run(train_command("--model", tiny_model, "--data", learnable_shards, "--output",
                                          tmp_path / "run", "--global-batch-size", "8", "--use-liger-kernel"),
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "--use-liger-kernel needs a GPU")
    assert "pip install" not in result.stderr  # installing it would not help on a CPU
    assert not (tmp_path / "run" / ".treg").exists()  # refused before the folder was claimed


def test_flex_attention_on_a_cpu_is_refused_before_any_work(tiny_model, learnable_shards, tmp_path):
    """Flex attention has no backward on a CPU: refused up front, with what runs there."""
    result = subprocess.run(train_command("--model", tiny_model, "--data", learnable_shards, "--output",
                                          tmp_path / "run", "--global-batch-size", "8", "--max-steps", "1",
                                          "--attn-implementation", "flex_attention"),
                            capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, "--attn-implementation flex_attention needs a GPU", "varlen", "sdpa")
    assert not (tmp_path / "run" / ".treg").exists()


def test_gpu_kernels_are_refused_on_a_cpu_only():
    from treg_core.errors import UserError
    from treg_train.config import TrainConfig
    from treg_train.preflight import check_device

    for settings in ({"attn_implementation": "flex_attention"}, {"use_liger_kernel": True}):
        check_device(TrainConfig(**settings), "cuda")
        with pytest.raises(UserError, match="needs a GPU"):
            check_device(TrainConfig(**settings), "cpu")
