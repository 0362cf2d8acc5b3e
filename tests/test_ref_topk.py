"""treg-score --ref-topk K: each response token's K most likely reference tokens and their log-probs
(*_ref_topk_ids, *_ref_topk_logps), from the transformers scorer and from the real vLLM engine, alike."""

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import hf_score_config, make_pairs, read_shard_rows, write_jsonl

from treg_core.command_line import load_settings
from treg_core.contract import SIDES, read_shard_metadata, shard_files, shard_schema
from treg_core.errors import UserError
from treg_data import pipeline
from treg_data.config import ScoreConfig, validate
from treg_data.hub import write_card

K = 25  # above vLLM's own max_logprobs (20): the engine must be started with a larger one
TOLERANCE = 1e-4  # vLLM against transformers, both float32


@pytest.fixture(scope="module")
def scored(tiny_model, tmp_path_factory):
    """A transformers-scored folder of 4 pairs with --ref-topk K, and its rows."""
    root = tmp_path_factory.mktemp("topk")
    data = write_jsonl(root / "pairs.jsonl", make_pairs(4))
    pipeline.run(hf_score_config(tiny_model, data, root / "out", ref_topk=K))
    return {"data": data, "out": root / "out", "rows": read_shard_rows(root / "out")}


def _reference_logps(model, rows: list[dict], side: str) -> list[np.ndarray]:
    """log π(· | prompt, y_<t) over the whole vocabulary at each response position, [L, vocab], by a plain
    transformers forward per sequence (not treg's kernel)."""
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(network(torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])).logits[0].double(),
                                  dim=-1)[len(row["prompt_ids"]) - 1:-1].numpy() for row in rows]


def test_shards_hold_the_reference_top_k_of_every_response_token(tiny_model, scored):
    shard = shard_files(scored["out"])[0]
    assert pq.read_schema(shard).remove_metadata() == shard_schema(topk=True)
    assert read_shard_metadata(shard).provenance.ref_topk == K
    for side in SIDES:
        full = _reference_logps(tiny_model, scored["rows"], side)
        for row, logps in zip(scored["rows"], full):
            ids, top = np.asarray(row[f"{side}_ref_topk_ids"]), np.asarray(row[f"{side}_ref_topk_logps"])
            actual, ref = np.asarray(row[f"{side}_ids"]), np.asarray(row[f"{side}_ref_logps"])
            assert ids.shape == top.shape == (len(actual), K)
            # by log-prob, most likely first; ties by token id
            assert (np.diff(top, axis=1) <= 0).all()
            assert ((np.diff(top, axis=1) < 0) | (np.diff(ids, axis=1) > 0)).all()
            assert all(len(set(position)) == K for position in ids.tolist())
            # the direct log-softmax's values at those ids, and no other token above the K-th
            np.testing.assert_allclose(top, np.take_along_axis(logps, ids, axis=1), atol=1e-5)
            others = logps.copy()
            np.put_along_axis(others, ids, -np.inf, axis=1)
            assert (others.max(axis=1) <= top[:, -1] + 1e-5).all()
            # the actual token's *_ref_logps agrees: its own entry where it is in the top K, below the K-th elsewhere
            inside = ids == actual[:, None]
            present = inside.any(axis=1)
            np.testing.assert_allclose(top[inside], ref[present], atol=1e-5)
            assert (ref[present] >= top[present, -1] - 1e-5).all()
            assert (ref[~present] <= top[~present, -1] + 1e-5).all()


def test_the_card_lists_the_columns_and_a_rerun_with_another_k_is_refused(tiny_model, scored):
    from treg_data.report import select_rows

    assert len(select_rows(scored["out"], sample=2)) == 2  # treg-inspect reads its own columns beside them
    with pytest.raises(UserError, match="already holds data scored with other settings \\(ref_topk differ"):
        pipeline.run(hf_score_config(tiny_model, scored["data"], scored["out"], ref_topk=K + 1))
    text = write_card(scored["out"], "treg/topk").read_text()
    assert "| `*_ref_topk_ids` | the reference's K most likely token ids" in text
    assert "| `*_ref_topk_logps` | their log-probs under the reference" in text
    front = yaml.safe_load(text.split("---")[1])
    assert [f["name"] for f in front["dataset_info"]["features"]] == shard_schema(topk=True).names
    loaded = datasets.load_dataset(str(scored["out"]), split="train")
    assert loaded.num_rows == 4 and len(loaded[0]["chosen_ref_topk_ids"][0]) == K


@pytest.mark.parametrize("value", [-1, 101, 2.5])
def test_a_k_out_of_range_is_refused(value):
    with pytest.raises(UserError, match="ref-topk|ref_topk"):
        validate(load_settings(ScoreConfig, None, {"dataset": "d", "model": "m", "output": "o", "ref_topk": value}))


@pytest.fixture(scope="module")
def engine(tiny_model):
    """One vLLM engine for the module."""
    from treg_data.scorers import EngineOptions
    from treg_data.scorers.vllm_scorer import VLLMScorer

    scorer = VLLMScorer(EngineOptions(model=tiny_model, dtype="float32", max_model_len=512,
                                      engine={"enforce_eager": True}, topk=K))
    yield scorer
    scorer.close()


@pytest.mark.engine
def test_vllm_gives_the_transformers_top_k_on_both_paths(scored, engine, monkeypatch):
    requests = [(row["prompt_ids"], row[f"{side}_ids"]) for row in scored["rows"] for side in SIDES]
    want = [(np.asarray(row[f"{side}_ref_topk_ids"]), np.asarray(row[f"{side}_ref_topk_logps"]))
            for row in scored["rows"] for side in SIDES]
    assert engine.scoring_path == "cached_prefix_rows"  # the CPU build
    cached = engine.score_topk(requests, K)
    monkeypatch.setattr(engine, "scoring_path", "token_id_rows")  # where the scores are not cached: every row
    plain = engine.score_topk(requests, K)
    for got in (cached, plain):
        compared = total = 0
        for (ids, logps), (want_ids, want_logps) in zip(got, want):
            assert ids.dtype == np.int32 and logps.dtype == np.float32 and ids.shape == want_ids.shape
            np.testing.assert_allclose(logps, want_logps, atol=TOLERANCE)
            # ids by rank, where the rank's log-prob is apart from its neighbours' (the K-th's neighbour beyond the
            # top K is unknown: left out)
            gaps = -np.diff(want_logps, axis=1)
            apart = np.ones_like(want_ids, dtype=bool)
            apart[:, 1:] &= gaps > 2 * TOLERANCE
            apart[:, :-1] &= gaps > 2 * TOLERANCE
            apart[:, -1] = False
            np.testing.assert_array_equal(ids[apart], want_ids[apart])
            compared, total = compared + apart.sum(), total + apart.size
        assert compared >= 0.5 * total, (compared, total)  # the comparison is not vacuous


@pytest.mark.engine
def test_vllm_top_k_after_a_prefix_read_from_the_cache(tiny_model, engine):
    from treg_data.scorers import EngineOptions
    from treg_data.scorers.hf_scorer import HFScorer

    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 500, 300).tolist()  # spans cache blocks (128 tokens on the CPU)
    requests = [(prefix, rng.integers(3, 500, 12).tolist()) for _ in range(2)]
    cached_before = engine.cached_tokens
    got = engine.score_topk(requests, K)
    assert engine.cached_tokens > cached_before  # the prefix was read from the cache, not run
    want = HFScorer(EngineOptions(model=tiny_model, dtype="float32")).score_topk(requests, K)
    for (ids, logps), (want_ids, want_logps) in zip(got, want):
        np.testing.assert_allclose(logps, want_logps, atol=TOLERANCE)
        assert (ids[:, 0] == want_ids[:, 0]).mean() > 0.9


def test_vllm_flat_prompt_logprobs_give_the_ranks_after_the_actual_token_ties_by_id():
    from vllm.logprobs import FlatLogprobs

    from treg_data.scorers.vllm_scorer import flat_response_topk

    prefix, response, k = [1, 5], [7, 8], 3
    flat = FlatLogprobs()
    flat.append(None)  # the first token has no log-prob
    # per position: the actual token (its rank), then ranks 1..k, as vLLM appends them (duplicates kept)
    for actual, rank, top in [(5, 9, [(4, -0.5), (3, -1.0), (2, -2.0)]),
                              (7, 2, [(9, -0.2), (7, -1.5), (6, -1.5)]),
                              (8, 5, [(12, -0.1), (11, -0.1), (10, -3.0)])]:
        flat.append_fast([actual] + [t for t, _ in top], [-9.0] + [lp for _, lp in top],
                         iter([rank, *range(1, k + 1)]), [None] * (k + 1))
    ids, logps = flat_response_topk(flat, prefix, response, k)
    assert ids.tolist() == [[9, 6, 7], [11, 12, 10]]  # the -1.5 and -0.1 ties by token id
    assert logps.dtype == np.float32 and logps.tolist() == np.float32([[-0.2, -1.5, -1.5], [-0.1, -0.1, -3.0]]).tolist()
    with pytest.raises(RuntimeError, match="other tokens"):
        flat_response_topk(flat, prefix, [7, 9], k)
    with pytest.raises(RuntimeError, match="top 4"):
        flat_response_topk(flat, prefix, response, 4)


def test_the_top_k_ids_are_not_taken_for_token_rewards():
    """--reward-column names a per-token column; the top-K ids are K token ids per token, as `ids` are one."""
    from treg_train.config import TrainConfig
    from treg_train.config import validate as validate_training

    for name in ("ids", "ref_topk_ids"):
        with pytest.raises(UserError, match=f"--reward-column {name} holds token ids"):
            validate_training(TrainConfig(model="m", data="d", output="o", reward_column=name))
