"""The model families users bring, end to end: a tiny random model of each architecture with a
tokenizer carrying the family's special tokens and its real chat template; treg-score in the real
vLLM engine at the default dtype, checked token for token against a transformers forward;
treg-train dpo_reg under torchrun with 2 processes; the export reloaded in transformers, with the tensors and
config vLLM loaded from the starting checkpoint (an export scored in vLLM: tests/test_train_e2e.py).
Conversations a family's template refuses become skips with a reason."""

import json

import numpy as np
import pytest
from families import FAMILIES, build_family_model
from helpers import (
    checkpoint_layout,
    make_learnable_pairs,
    make_pairs,
    read_shard_rows,
    run,
    score_command,
    train_command,
    write_jsonl,
)

from treg_data import pipeline

pytestmark = pytest.mark.engine

LIMITS = ["--max-length", "384", "--max-prompt-length", "256"]
TWO_USER_TURNS = {"id": "two-user-turns",
                  "chosen": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Add 2 and 2."},
                             {"role": "assistant", "content": "4"}],
                  "rejected": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Add 2 and 2."},
                               {"role": "assistant", "content": "5"}]}
# What each template does with a system turn and with two user turns in a row.
REFUSED = {
    "llama3": {},
    "qwen2_5": {},
    "gemma2": {"system": "template_error", "two-user-turns": "template_error"},  # raises on both
    # mistral drops the system text of a finished conversation
    "mistral": {"system": "template_not_prefix", "two-user-turns": "template_error"},
}


def _score(model, data, output, *extra):
    return run(score_command("--model", model, "--dataset", data, "--output", str(output),
                 *LIMITS, "--enforce-eager", "--shard-size", "20", *extra))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = make_pairs(12) + make_learnable_pairs(36) + [TWO_USER_TURNS]
    return write_jsonl(tmp_path_factory.mktemp("families") / "pairs.jsonl", rows), rows


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, data, tmp_path_factory):
    """Everything the tests check, done once per family."""
    name, (path, rows) = request.param, data
    root = tmp_path_factory.mktemp(name)
    model = build_family_model(name, root / "model")
    scored = _score(model, path, root / "vllm")  # default --dtype auto
    assert scored.returncode == 0, scored.stderr[-3000:]
    pipeline.run(pipeline.ScoreConfig(model=model, dataset=path, output=str(root / "hf"), backend="hf",
                                      max_length=384, max_prompt_length=256, shard_size=20,
                                      reward_check=False))
    trained = run(train_command("--model", model, "--data", root / "vllm", "--output", root / "run",
                                "--loss", "dpo_reg", "--global-batch-size", "8", "--max-steps", "8",
                                "--learning-rate", "2e-4", "--beta", "0.1",
                                "--logging-steps", "1", "--max-length", "384", "--micro-batch-tokens", "1536",
                                "--save-steps", "0", processes=2))
    assert trained.returncode == 0, trained.stderr[-3000:]
    return dict(name=name, model=model, root=root, rows=rows, scored=scored, trained=trained)


def test_prompt_ids_are_the_templates_generation_prompt(family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family["model"])
    rows = read_shard_rows(family["root"] / "vllm")
    assert rows
    for row in rows:
        expected = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
        assert row["prompt_ids"] == expected, row["id"]
        if tokenizer.bos_token_id is not None:
            assert (row["prompt_ids"].count(tokenizer.bos_token_id) == 1
                    and row["prompt_ids"][0] == tokenizer.bos_token_id)
        full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) == full, row["id"]


def test_default_dtype_matches_the_transformers_reference(family):
    manifest = json.loads((family["root"] / "vllm" / "manifest.json").read_text())
    assert manifest["provenance"]["dtype"] == "float32"  # the checkpoint's own, never "auto"
    vllm_rows, hf_rows = read_shard_rows(family["root"] / "vllm"), read_shard_rows(family["root"] / "hf")
    assert [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows]
    worst = max(float(np.abs(np.subtract(a[c], b[c])).max()) for a, b in zip(vllm_rows, hf_rows)
                for c in a if c.endswith("_logps"))
    print(f"{family['name']}: largest per-token log-prob difference vLLM vs transformers {worst:.2e}")
    assert worst <= 1e-4, worst


def test_refused_conversations_are_skips_with_their_reason(family):
    assert "Traceback" not in family["scored"].stderr
    skipped = [json.loads(line) for line in (family["root"] / "vllm" / "skipped.jsonl").read_text().splitlines()]
    reasons = {entry["id"]: entry["reason"] for entry in skipped}
    with_system = [r["id"] for r in family["rows"]
                   if isinstance(r.get("prompt"), list) and r["prompt"][0]["role"] == "system"]
    expected = {}
    for rid in with_system:
        if "system" in REFUSED[family["name"]]:
            expected[rid] = REFUSED[family["name"]]["system"]
    if "two-user-turns" in REFUSED[family["name"]]:
        expected["two-user-turns"] = REFUSED[family["name"]]["two-user-turns"]
    assert {rid: reason for rid, reason in reasons.items()
            if rid in expected or rid == "two-user-turns" or rid in with_system} == expected
    if family["name"] == "gemma2":
        assert any("System role not supported" in entry["detail"] for entry in skipped)


def test_two_process_training_learns(family):
    metrics = [json.loads(line) for line in (family["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert np.mean([m["loss"] for m in metrics[-3:]]) < np.mean([m["loss"] for m in metrics[:3]])
    assert "warning" not in family["trained"].stderr  # shards scored in the policy's own precision


def test_export_reloads_in_transformers_with_the_layout_vllm_loaded(family):
    import torch
    from transformers import AutoModelForCausalLM

    final = family["root"] / "run" / "final"
    assert checkpoint_layout(final) == checkpoint_layout(family["model"])  # as vLLM read it from the start
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.float32  # exported in the starting checkpoint's dtype
    assert torch.isfinite(model(torch.tensor([[1, 5, 9, 12]])).logits).all()


def test_a_system_role_prompt_set_reaches_the_model_in_every_family(family):
    """Gemma-2's template refuses a system turn: the text then heads the first user turn."""
    from transformers import AutoTokenizer

    from treg_data.encoding import PairEncoder, keeps_system
    from treg_data.lengths import LengthLimits
    from treg_data.pairs import Columns, parse_pair
    from treg_data.revision_prompts import SHIPPED

    tokenizer = AutoTokenizer.from_pretrained(family["model"])
    encoded = PairEncoder(tokenizer, SHIPPED["truthful"], LengthLimits(384, 256, 1024)).encode(
        parse_pair(make_learnable_pairs(1)[0], Columns()))
    for direction in ("better", "worse"):
        text = tokenizer.decode(encoded.rejected.prefixes[direction])
        assert text.count(getattr(SHIPPED["truthful"], direction)) == 1 and "Please add" in text
    if family["name"] != "mistral":  # Mistral's keeps the text of a conversation that ends with a user turn
        assert keeps_system(tokenizer) == (family["name"] != "gemma2")
