"""TDPO's KL from the reference's stored top-K tokens against the exact KL: the relative error of the loss and of the
gradient, and the share of the KL the bound keeps, for K = 5, 20, 50.

    python pipelines/bench/tdpo_topk.py --model small            # the small random-weight shape
    python pipelines/bench/tdpo_topk.py --model ~/.cache/treg/smollm2-135m-instruct-v1

The reference is --model; the policy is the reference with every weight moved by Gaussian noise of --noise times
that weight's standard deviation (a policy some way into training). The pairs are the first --pairs shipped
quickstart pairs with an explicit prompt, under the model's chat template. The top-K are taken from the reference's
own distribution in float32, as treg-score --ref-topk stores them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SIZES, local_model  # noqa: E402

from treg_core.forward import TokenLogprobs  # noqa: E402
from treg_train.collate import collate, scatter_tokens  # noqa: E402
from treg_train.index import TrainingPair  # noqa: E402
from treg_train.losses import LossSettings  # noqa: E402
from treg_train.step import Objective  # noqa: E402


def training_pairs(model: str, count: int) -> list[TrainingPair]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [row for line in (ROOT / "pipelines/data/quickstart-pairs.jsonl").read_text().splitlines()
            if "prompt" in (row := json.loads(line))]  # the rows with an explicit prompt
    pairs = []
    for n, row in enumerate(rows[:count]):
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        prompt_ids = np.asarray(tokenizer(text, add_special_tokens=False).input_ids)
        sides = [np.asarray(tokenizer(text if isinstance(text, str) else text[-1]["content"],
                                      add_special_tokens=False).input_ids + [tokenizer.eos_token_id or 0])
                 for text in (row["chosen"], row["rejected"])]
        zeros = [np.zeros(len(s), dtype=np.float32) for s in sides]
        pairs.append(TrainingPair(str(n), prompt_ids, *sides, *zeros, *zeros))
    return pairs


def moved(reference: torch.nn.Module, noise: float, seed: int = 0) -> torch.nn.Module:
    import copy

    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise * parameter.std())
    return policy


def loss_and_gradient(objective: Objective, batch) -> tuple[float, torch.Tensor, float]:
    objective.policy.zero_grad()
    losses, metrics = objective.losses(batch)
    losses.mean().backward()
    gradient = torch.cat([p.grad.flatten() for p in objective.policy.parameters() if p.grad is not None])
    return losses.mean().item(), gradient, float((metrics["kl/chosen"] + metrics["kl/rejected"]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help=f"a model folder, or one of {', '.join(SIZES)}")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--loss", default="tdpo2", choices=["tdpo1", "tdpo2"])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model = args.model if args.model not in SIZES else local_model(Path(tempfile.mkdtemp()), args.model)
    torch.manual_seed(0)
    reference_lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    reference = TokenLogprobs(reference_lm)
    policy = TokenLogprobs(moved(reference_lm, args.noise))
    pairs = training_pairs(model, args.pairs)
    batch = collate(pairs, padding_free=False)
    settings = LossSettings(args.loss, beta=0.1, tdpo_alpha=0.5)
    exact_loss, exact_gradient, exact_kl = loss_and_gradient(Objective(policy, reference, settings), batch)

    args_in = (batch.input_ids, batch.position_ids, batch.predict_index, batch.targets)
    with torch.no_grad():  # the reference's whole distribution once, as treg-score would score it
        hidden = reference(*args_in, hidden_only=True)
        logits = reference.transform(reference_lm.get_output_embeddings()(hidden).float())
        log_probs = torch.log_softmax(logits, dim=-1)
    batch.ref_logps = scatter_tokens(log_probs.gather(-1, batch.targets[:, None]).squeeze(-1), batch.token_mask)
    vocab = log_probs.shape[-1]
    print(f"model {args.model}: vocabulary {vocab}, {args.pairs} pairs, {int(batch.token_mask.sum())} response "
          f"tokens, {args.loss}, policy = reference + {args.noise:g}·std noise")
    print(f"exact: loss {exact_loss:.6f}, sequential KL per response {exact_kl / 2:.4f}")
    print("| K | reference mass in the K | KL kept | loss rel. error | gradient rel. error |")
    print("|---|---|---|---|---|")
    for k in (5, 20, 50):
        top = log_probs.topk(k, dim=-1)
        batch.ref_topk_ids, batch.ref_topk_logps = top.indices, top.values
        loss, gradient, kl = loss_and_gradient(Objective(policy, None, settings), batch)
        mass = top.values.exp().sum(-1).mean().item()
        print(f"| {k} | {mass:.3f} | {kl / exact_kl:.3f} | {abs(loss - exact_loss) / abs(exact_loss):.2e} | "
              f"{(gradient - exact_gradient).norm().item() / exact_gradient.norm().item():.2e} |")


if __name__ == "__main__":
    main()
