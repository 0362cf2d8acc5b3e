"""The model's side of the benchmark: sampling and greedy answers (transformers generate), and
per-token log-probs and ground-truth labels of responses, split exactly as treg-score splits them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import world


def load(model_dir: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def rendered_prompt(tokenizer, task: world.Task) -> str:
    from treg_data.encoding import render

    return render(tokenizer, [{"role": "user", "content": task.prompt}], generation_prompt=True)


@torch.inference_mode()
def answers(model, tokenizer, tasks: list[world.Task], samples: int = 1, seed: int = 0,
            batch_prompts: int = 128) -> list[list[str]]:
    """`samples` answers per task at temperature 1, or the greedy answer when samples is 0; room
    for two digits more than the longest task's answer."""
    torch.manual_seed(seed)
    sampling = (dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=samples) if samples
                else dict(do_sample=False))
    out = []
    for start in range(0, len(tasks), batch_prompts):
        chunk = tasks[start:start + batch_prompts]
        inputs = tokenizer([rendered_prompt(tokenizer, t) for t in chunk], add_special_tokens=False,
                           padding=True, return_tensors="pt")
        max_new_tokens = 2 * (max(t.n for t in chunk) + 2)  # a digit and a comma per number
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, **sampling)
        texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        per_task = max(samples, 1)
        out.extend(texts[i:i + per_task] for i in range(0, len(texts), per_task))
    return out


def encode(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids incl. end-of-turn), split exactly as treg-score splits a pair."""
    from treg_data.encoding import answer_token_ids, prompt_token_ids

    return (prompt_token_ids(tokenizer, prompt),
            answer_token_ids(tokenizer, prompt, {"role": "assistant", "content": answer}))


def response_ids(tokenizer, task: world.Task, response: str) -> tuple[list[int], list[int]]:
    return encode(tokenizer, [{"role": "user", "content": task.prompt}], response)


def labels_of(tokenizer, task: world.Task, response: str, ids: list[int]) -> np.ndarray:
    """Ground-truth label of each response token (world.GOOD / BAD / NEUTRAL)."""
    from treg_data.report import token_texts

    chars, end_label = world.char_labels(task, response)
    return world.token_labels(token_texts(tokenizer, [], ids), chars, end_label)


def token_logps(model_dir: str | Path, requests: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
    """log π(y_t | x, y_<t) for each (prompt ids, response ids), by the transformers scorer."""
    from treg_data.scorers import EngineOptions
    from treg_data.scorers.hf_scorer import HFScorer

    return HFScorer(EngineOptions(model=str(model_dir), dtype="float32")).score(requests)
