"""The quickstart's model: a small Llama trained here, on the CPU, to understand T-REG's revision prompts.

A randomly initialised model scores every response alike after both revision prompts, so its r̂ is noise. This
one is trained on the shipped pairs (pipelines/data/quickstart-pairs.jsonl) in three parts, each tokenized
exactly as treg-score tokenizes the pair (treg_data.encoding):

- **policy**: the prompt, then the chosen or the rejected answer, one as likely as the other: the starting
  policy, which cannot tell them apart;
- **better**: the default `better` revision prompt quoting either answer, then the chosen one;
- **worse**: the default `worse` revision prompt quoting either answer, then the rejected one.

So after the `better` prompt it expects the chosen answer's tokens and after the `worse` prompt the rejected
one's: r̂ = σ(log p_better − log p_worse) − ½ is about 0 where the two answers agree and negative on the token
where the rejected answer goes wrong. It plays a model that knows the right answers; it has learnt them from
these very pairs, so it shows what r̂ looks like, not how well a model generalises.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "data" / "quickstart-pairs.jsonl"
MODEL_SHAPE = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
VERSION = "quickstart-model-v2"  # the cache folder's name: a new recipe gets a new name


def examples(tokenizer) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(prefix ids, answer ids) of every pair, by part; the drafts the revision prompts quote are both answers."""
    from treg_data.encoding import PairEncoder
    from treg_data.inputs import open_source
    from treg_data.lengths import LengthLimits
    from treg_data.pairs import Columns, parse_pair
    from treg_data.revision_prompts import DEFAULT_REVISION_PROMPTS

    encoder = PairEncoder(tokenizer, DEFAULT_REVISION_PROMPTS, LengthLimits(512, 256, 2048))
    source = open_source(str(PAIRS), "train", None)
    parts: dict[str, list] = {"policy": [], "better": [], "worse": []}
    for _, row in source.rows(0, source.num_rows):
        pair = encoder.encode(parse_pair(row, Columns()))
        for draft in (pair.chosen, pair.rejected):
            parts["policy"].append((pair.prompt_ids, draft.ids))
            parts["better"].append((draft.prefixes["better"], pair.chosen.ids))
            parts["worse"].append((draft.prefixes["worse"], pair.rejected.ids))
    return parts


def batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels on the answer only, and the attention mask."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prefix, answer) in enumerate(rows):
        input_ids[i, : len(prefix) + len(answer)] = torch.tensor(prefix + answer)
        labels[i, len(prefix): len(prefix) + len(answer)] = torch.tensor(answer)
        attention[i, : len(prefix) + len(answer)] = 1
    return input_ids, labels, attention


def build(folder: Path, steps: int = 600, batch_size: int = 16, lr: float = 2e-3, seed: int = 0) -> Path:
    """Train and save the model into `folder`, unless it is there (written aside, then renamed: never half there)."""
    sys.path.insert(0, str(HERE))
    from tiny_model import build_trained, train_from_scratch

    def train(model, tokenizer) -> None:
        parts = examples(tokenizer)
        print(f"training the quickstart model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
              f"to understand the revision prompts: {steps} steps of {batch_size}", flush=True)
        rng = random.Random(seed)
        train_from_scratch(model, lambda step: batch(rng.sample(parts[("policy", "better", "worse")[step % 3]],
                                                                batch_size), tokenizer.pad_token_id),
                           steps, lr, seed=seed)

    return build_trained(folder, train, seed=seed, **MODEL_SHAPE)
