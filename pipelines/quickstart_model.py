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

import os
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tiny_model import answer_batch, build_trained, train_from_scratch  # noqa: E402

PAIRS = HERE / "data" / "quickstart-pairs.jsonl"
MODEL_SHAPE = dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=256)  # head_dim 64: vLLM CPU
VERSION = "quickstart-model-v3"  # the cache folder's name: a new recipe gets a new name
STEPS = 600


def folder_name(steps: int) -> str:
    """The cache folder of the model trained `steps` steps: another count is another model, never the shipped one."""
    return VERSION if steps == STEPS else f"{VERSION}-{steps}-steps"


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


def answer_loss(model, rows: list[tuple[list[int], list[int]]], shared: list[int], pad: int) -> torch.Tensor:
    """The mean next-token loss over the answers of `rows`, whose prefixes all start with `shared`.

    The same loss as each row run whole, at a fraction of the cost: `shared` (the revision prompt's instructions,
    about half of a `better` or `worse` row) runs once, and its keys and values are repeated for every row."""
    start = model(input_ids=torch.tensor([shared]), use_cache=True)
    cache = start.past_key_values
    cache.batch_repeat_interleave(len(rows))
    input_ids, labels, attention = answer_batch([(prefix[len(shared):], answer) for prefix, answer in rows], pad)
    rest = model(input_ids=input_ids, past_key_values=cache,
                 attention_mask=torch.cat([torch.ones(len(rows), len(shared), dtype=attention.dtype), attention], 1),
                 position_ids=(len(shared) + torch.arange(input_ids.shape[1])).expand(len(rows), -1)).logits
    # Token t is predicted from position t - 1: the first one after `shared` from its last position.
    logits = torch.cat([start.logits[:, -1:].expand(len(rows), -1, -1), rest[:, :-1]], 1)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def build(folder: Path, steps: int = STEPS, batch_size: int = 16, lr: float = 2e-3, seed: int = 0) -> Path:
    """Train and save the model into `folder`, unless it is there (written aside, then renamed: never half there)."""
    def train(model, tokenizer) -> None:
        parts = examples(tokenizer)
        shared = {name: os.path.commonprefix([prefix for prefix, _ in rows]) for name, rows in parts.items()}
        print(f"training the quickstart model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
              f"to understand the revision prompts: {steps} steps of {batch_size}", flush=True)
        rng = random.Random(seed)

        def loss_at(step: int) -> torch.Tensor:
            part = ("policy", "better", "worse")[step % 3]
            return answer_loss(model, rng.sample(parts[part], batch_size), shared[part], tokenizer.pad_token_id)

        train_from_scratch(model, loss_at, steps, lr, seed=seed)

    return build_trained(folder, train, seed=seed, **MODEL_SHAPE)
