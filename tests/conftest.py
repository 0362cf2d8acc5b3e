import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))  # tiny_model: test and demo support
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread a process, here and in the commands tests start: two workers share two cores, and on tiny models a
# second thread costs more than it gives (the suite's wall time fell 11 % on a module pair, its CPU time 18 %).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def learnable_shards(tiny_model, tmp_path_factory):
    """A treg-score output folder (transformers scorer, for speed) of 96 learnable pairs."""
    from helpers import make_learnable_pairs, write_jsonl

    from treg_data import pipeline

    root = tmp_path_factory.mktemp("learnable")
    data = write_jsonl(root / "pairs.jsonl", make_learnable_pairs(96))
    pipeline.run(pipeline.ScoreConfig(model=tiny_model, dataset=data, output=str(root / "scored"), backend="hf",
                                      dtype="float32", max_length=256, max_prompt_length=128, shard_size=40,
                                      reward_check=False))
    return str(root / "scored")
