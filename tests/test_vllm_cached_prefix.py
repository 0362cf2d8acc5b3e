"""The cached_prefix_rows path in the real engine: prefixes long enough to span cache blocks are
read from the prefix cache, and the response log-probs still equal the transformers reference."""

import numpy as np
import pytest
import vllm

from treg_core.errors import UserError
from treg_data.scorers import EngineOptions
from treg_data.scorers.hf_scorer import HFScorer
from treg_data.scorers.vllm_scorer import VLLMScorer, prefix_chunks

pytestmark = pytest.mark.engine


def test_prefix_chunks_keep_order_and_bound_prefix_tokens():
    requests = [([1] * n, [2]) for n in (5, 5, 5, 12, 1)]
    assert prefix_chunks(requests, 10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert prefix_chunks(requests, 100) == [(0, 5)]
    assert prefix_chunks([], 10) == []


@pytest.fixture(scope="module")
def scorer(tiny_model):
    """One engine for the module."""
    engine = VLLMScorer(EngineOptions(model=tiny_model, dtype="float32", max_model_len=512,
                                      engine={"enforce_eager": True}))
    yield engine
    engine.close()


def test_cached_prefixes_give_the_reference_log_probs(tiny_model, scorer):
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(3, 500, n).tolist() for n in (300, 181, 64, 2)]
    # Two responses per prefix, as chosen and rejected share the policy prompt.
    requests = [(prefix, rng.integers(3, 500, rng.integers(1, 40)).tolist()) for prefix in prefixes for _ in (0, 1)]
    # A cache hit must never reach into a response: a repeated sequence, and a response sharing
    # its first 100 tokens with an earlier one (cache blocks hold 128 tokens on the CPU), are run
    # again without the cache.
    common = rng.integers(3, 500, 100).tolist()
    requests += [(prefixes[1], common + [7]), (prefixes[1], common + [7]), (prefixes[1], common + [8, 9])]
    assert scorer.scoring_path == "cached_prefix_rows"
    scorer.chunk_tokens = 400  # several chunks
    block = scorer.llm.llm_engine.vllm_config.cache_config.block_size
    got = scorer.score(requests)
    assert scorer.checked  # its first sequences agreed with the every-row path
    want = HFScorer(EngineOptions(model=tiny_model, dtype="float32")).score(requests)
    assert [len(g) for g in got] == [len(r) for _, r in requests]
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) <= 1e-4
    assert scorer.cached_tokens >= 2 * ((300 - 1) // block * block)  # the longest prefix's full blocks, twice
    assert scorer.rerun_sequences >= 2


def test_a_fast_path_that_disagrees_with_the_every_row_path_stops_the_run(scorer, monkeypatch):
    requests = [([5, 6, 7, 8], [9, 10, 11]), ([5, 6], [12])]
    honest = scorer.score_cached_prefix_rows
    monkeypatch.setattr(scorer, "score_cached_prefix_rows", lambda r: [logps - 0.5 for logps in honest(r)])
    monkeypatch.setattr(scorer, "checked", False)
    with pytest.raises(UserError) as raised:
        scorer.score(requests)
    message = str(raised.value)
    assert "\n" not in message and f"vLLM {vllm.__version__}" in message and "cached_prefix_rows" in message
    assert "by up to 0.5 " in message and not scorer.checked
    monkeypatch.setattr(scorer, "score_cached_prefix_rows", honest)
    assert len(scorer.score(requests)) == 2 and scorer.checked  # the honest path passes the same check
