"""A real pretrained model, SmolLM2-135M-Instruct (pipelines/real_model.py: built once from its GGUF and cached):
vLLM and the transformers scorer agree on it in fp32 with a contrastive prompt set through its own ChatML
template, the reward check runs in vLLM's engine, and dpo_reg trains on it and exports a model that generates."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_shard_rows, run, score_command, train_command, write_jsonl

from treg_core.contract import read_manifest
from treg_data.probe import SHIPPED_PAIRS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))

pytestmark = pytest.mark.engine

FLOATS = [f"{side}_{name}" for side in ("chosen", "rejected")
          for name in ("ref_logps", "better_logps", "worse_logps", "rewards")]


@pytest.fixture(scope="module")
def smollm2():
    import real_model

    return str(real_model.build())


@pytest.fixture(scope="module")
def scored(smollm2, tmp_path_factory):
    """Two pairs of each kind of the shipped probe set, scored by vLLM (with the reward check) and by transformers."""
    root = tmp_path_factory.mktemp("smollm2")
    rows, kinds = [], {}
    for line in SHIPPED_PAIRS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if kinds.setdefault(row["kind"], 0) < 2:
            kinds[row["kind"]] += 1
            rows.append(row)
    data = write_jsonl(root / "pairs.jsonl", rows)
    common = ["--model", smollm2, "--dataset", data, "--dtype", "float32", "--revision-prompts", "instruct",
              "--max-length", "256", "--max-prompt-length", "128"]
    vllm_run = run(score_command(*common, "--output", root / "vllm", "--enforce-eager", "--reward-check"))
    assert vllm_run.returncode == 0, vllm_run.stderr[-3000:]
    hf_run = run(score_command(*common, "--output", root / "hf", "--backend", "hf"))
    assert hf_run.returncode == 0, hf_run.stderr[-3000:]
    return dict(root=root, rows=rows, vllm=vllm_run)


def test_vllm_and_transformers_agree_on_the_real_model(scored):
    vllm_rows, hf_rows = read_shard_rows(scored["root"] / "vllm"), read_shard_rows(scored["root"] / "hf")
    assert [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows] == [r["id"] for r in scored["rows"]]
    worst = 0.0
    for a, b in zip(vllm_rows, hf_rows):
        assert a["prompt_ids"] == b["prompt_ids"] and a["rejected_ids"] == b["rejected_ids"]
        for column in FLOATS:
            worst = max(worst, float(np.abs(np.subtract(a[column], b[column])).max()))
    assert worst <= 1e-4, worst


def test_the_reward_check_ran_in_the_engine(scored):
    check = read_manifest(scored["root"] / "vllm").reward_check
    assert check["used"] == "instruct" and check["pairs"] >= 150
    assert "reward check: AUROC" in scored["vllm"].stderr
    assert 0 <= check["sets"]["instruct"]["auroc"] <= 1 and set(check["sets"]["instruct"]["by_kind"]) == {
        "fact", "arithmetic", "format", "reasoning"}


def test_dpo_reg_trains_the_real_model_and_its_export_generates(smollm2, scored, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = run(train_command("--model", smollm2, "--data", scored["root"] / "vllm", "--output", tmp_path / "run",
                                "--loss", "dpo_reg", "--max-steps", "2", "--global-batch-size", "4",
                                "--learning-rate", "1e-6"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(final)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # two small steps leave what the model knows in place
