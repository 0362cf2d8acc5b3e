import json
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))  # tiny_model: test and demo support
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Valid pairs in every shape users have: plain strings, conversational with an explicit
    prompt, implicit prompt in multi-turn conversations, unicode and edge whitespace."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        good, bad = f"The sum of {a} and {b} is {a + b}.", f"The sum of {a} and {b} is {a + b + rng.randint(1, 9)}."
        kind = i % 4
        if kind == 0:
            rows.append({"id": f"pair-{i}", "prompt": f"What is {a} plus {b}?", "chosen": good, "rejected": bad})
        elif kind == 1:
            user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Add {a} and {b}."}]
            rows.append({"id": f"pair-{i}", "prompt": user,
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
        elif kind == 2:
            history = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                       {"role": "user", "content": f"Compute {a} + {b}, please."}]
            rows.append({"id": f"pair-{i}",
                         "chosen": history + [{"role": "assistant", "content": good}],
                         "rejected": history + [{"role": "assistant", "content": bad}]})
        else:
            rows.append({"id": f"pair-{i}", "prompt": f"  Ünïcode → 数学: {a}+{b}? 🙂\n",
                         "chosen": f" \t{good} ✓ \n\n", "rejected": f"\n{bad} ✗  "})
    return rows


def bad_rows() -> list[dict]:
    """One row per kind of bad input, with the reason treg-score must report."""
    msg = lambda role, content: {"role": role, "content": content}  # noqa: E731
    return [
        {"id": "bad-missing", "prompt": "Hi", "chosen": "Hello"},
        {"id": "bad-null", "prompt": "Hi", "chosen": None, "rejected": "Bye"},
        {"id": "bad-empty", "prompt": "Hi", "chosen": "   ", "rejected": "Bye"},
        {"id": "bad-nonstring", "prompt": "Hi", "chosen": [msg("assistant", 42)], "rejected": "Bye"},
        {"id": "bad-last-turn", "chosen": [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Hm")],
         "rejected": [msg("user", "Hi"), msg("assistant", "Bye")]},
        {"id": "bad-identical", "prompt": "Hi", "chosen": "Same answer.", "rejected": "Same answer."},
        {"id": "bad-too-long", "prompt": "Hi", "chosen": "word " * 400, "rejected": "Short."},
    ]


BAD_REASONS = {
    "bad-missing": "missing_field",
    "bad-null": "missing_field",
    "bad-empty": "empty_response",
    "bad-nonstring": "non_string_content",
    "bad-last-turn": "last_turn_not_assistant",
    "bad-identical": "identical_responses",
    "bad-too-long": "too_long",
}


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def make_learnable_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs a tiny model learns to rank within a few steps: the chosen answer is always a
    polite confirmation, the rejected one a curt refusal."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"id": f"learn-{i}", "prompt": f"Please add {a} and {b}.",
                     "chosen": f"Sure! The sum of {a} and {b} is {a + b}.", "rejected": "No."})
    return rows


@pytest.fixture(scope="session")
def learnable_shards(tiny_model, tmp_path_factory):
    """A treg-score output folder (transformers scorer, for speed) of 96 learnable pairs."""
    from treg_data import pipeline

    root = tmp_path_factory.mktemp("learnable")
    data = write_jsonl(root / "pairs.jsonl", make_learnable_pairs(96))
    pipeline.run(pipeline.ScoreConfig(model=tiny_model, dataset=data, output=str(root / "scored"), backend="hf",
                                      dtype="float32", max_length=256, max_prompt_length=128, shard_size=40))
    return str(root / "scored")
