"""The cached_prefix_rows path in the real engine: prefixes long enough to span cache blocks are
read from the prefix cache, and the response log-probs still equal the transformers reference."""

import numpy as np
import pytest

from treg_data.scorers import EngineOptions
from treg_data.scorers.hf_scorer import HFScorer
from treg_data.scorers.vllm_scorer import VLLMScorer, prefix_chunks

pytestmark = pytest.mark.engine


def test_prefix_chunks_keep_order_and_bound_prefix_tokens():
    requests = [([1] * n, [2]) for n in (5, 5, 5, 12, 1)]
    assert prefix_chunks(requests, 10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert prefix_chunks(requests, 100) == [(0, 5)]
    assert prefix_chunks([], 10) == []


def test_cached_prefixes_give_the_reference_log_probs(tiny_model):
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(3, 500, n).tolist() for n in (300, 181, 64, 2)]
    # Two responses per prefix, as chosen and rejected share the policy prompt.
    requests = [(prefix, rng.integers(3, 500, rng.integers(1, 40)).tolist()) for prefix in prefixes for _ in (0, 1)]
    # A cache hit must never reach into a response: a repeated sequence, and a response sharing
    # its first 100 tokens with an earlier one (cache blocks hold 128 tokens on the CPU), are run
    # again without the cache.
    common = rng.integers(3, 500, 100).tolist()
    requests += [(prefixes[1], common + [7]), (prefixes[1], common + [7]), (prefixes[1], common + [8, 9])]
    options = EngineOptions(model=tiny_model, dtype="float32", max_model_len=512, engine={"enforce_eager": True})
    scorer = VLLMScorer(options)
    try:
        assert scorer.scoring_path == "cached_prefix_rows"
        scorer.chunk_tokens = 400  # several chunks
        block = scorer.llm.llm_engine.vllm_config.cache_config.block_size
        got = scorer.score(requests)
    finally:
        scorer.close()
    want = HFScorer(options).score(requests)
    assert [len(g) for g in got] == [len(r) for _, r in requests]
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) <= 1e-4
    assert scorer.cached_tokens >= 2 * ((300 - 1) // block * block)  # the longest prefix's full blocks, twice
    assert scorer.rerun_sequences >= 2
