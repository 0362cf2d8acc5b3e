"""treg-score --ce-scores: cDPO's contrastive estimate log p_ce(y_t) = log softmax_v(2·log π_pos − log π_neg)[y_t]
of each response token (*_ce_logps), from the positive (--dpo-model) and negative (--reverse-dpo-model) models,
both run in transformers whatever the back-end."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    assert_one_line_error,
    hf_score_config,
    make_pairs,
    perturbed_copy,
    read_shard_rows,
    run,
    score_command,
    write_jsonl,
)

from treg_core.contract import SIDES, read_shard_metadata, shard_files, shard_schema
from treg_core.errors import UserError
from treg_data import pipeline
from treg_data.hub import write_card

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """The positive and negative models: two perturbed copies of the tiny model."""
    root = tmp_path_factory.mktemp("ce-models")
    return perturbed_copy(tiny_model, root / "positive", seed=1), perturbed_copy(tiny_model, root / "negative", seed=2)


@pytest.fixture(scope="module")
def scored(tiny_model, models, tmp_path_factory):
    """A transformers-scored folder of 4 pairs with --ce-scores, and its rows."""
    root = tmp_path_factory.mktemp("ce")
    data = write_jsonl(root / "pairs.jsonl", make_pairs(4))
    positive, negative = models
    pipeline.run(hf_score_config(tiny_model, data, root / "out", dpo_model=positive, reverse_dpo_model=negative,
                                 ce_scores=True))
    return {"data": data, "out": root / "out", "rows": read_shard_rows(root / "out")}


def _response_logits(model: str, rows: list[dict], side: str) -> list[torch.Tensor]:
    """The logits [L, vocabulary] at the positions that predict each response token, float64, by a plain
    transformers forward per sequence (not treg's kernel)."""
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        return [network(torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])).logits[0].double()
                [len(row["prompt_ids"]) - 1:-1] for row in rows]


def test_the_shards_hold_the_contrastive_estimate_of_every_response_token(models, scored):
    shard = shard_files(scored["out"])[0]
    assert pq.read_schema(shard).remove_metadata() == shard_schema(dpo=True, reverse_dpo=True, ce=True)
    assert read_shard_metadata(shard).provenance.ce_scores is True
    largest_gap = 0.0
    for side in SIDES:
        for row, positive, negative in zip(scored["rows"], *(_response_logits(m, scored["rows"], side)
                                                             for m in models)):
            tokens = torch.tensor(row[f"{side}_ids"])
            scores = 2 * torch.log_softmax(positive, -1) - torch.log_softmax(negative, -1)
            want = torch.log_softmax(scores, -1).gather(-1, tokens[:, None]).squeeze(-1).numpy()
            got = np.asarray(row[f"{side}_ce_logps"], dtype=np.float64)
            assert got.shape == (len(tokens),)
            np.testing.assert_allclose(got, want, atol=TOLERANCE)
            assert np.isfinite(got).all() and (np.exp(got) > 0).all() and (np.exp(got) <= 1).all()
            largest_gap = max(largest_gap, float(np.abs(got - np.asarray(row[f"{side}_dpo_logps"])).max()))
    assert largest_gap > 1e-3  # not the positive model's own log-probs: the negative one counts


def test_loaded_beside_vllm_the_models_give_the_same_estimate(models, scored):
    """Under --backend vllm the two models are loaded from their engine options instead of taken from the hf
    back-end's scorers: the same numbers."""
    from treg_data.contrastive_estimate import ContrastiveEstimate
    from treg_data.scorers import EngineOptions

    estimate = ContrastiveEstimate(*(EngineOptions(model=m, dtype="float32") for m in models))
    requests = [(row["prompt_ids"], row[f"{side}_ids"]) for row in scored["rows"] for side in SIDES]
    got = estimate.score(requests)
    want = [row[f"{side}_ce_logps"] for row in scored["rows"] for side in SIDES]
    for values, expected in zip(got, want, strict=True):
        assert values.dtype == np.float32
        np.testing.assert_allclose(values, expected, atol=TOLERANCE)


def test_the_card_lists_the_column_and_a_rerun_without_the_flag_is_refused(tiny_model, models, scored):
    text = write_card(scored["out"], "treg/ce").read_text()
    assert "| `*_ce_logps` | log p_ce(y_t) = log softmax_v(2·log π_pos − log π_neg)[y_t]" in text
    positive, negative = models
    with pytest.raises(UserError, match="already holds data scored with other settings \\(ce_scores differ"):
        pipeline.run(hf_score_config(tiny_model, scored["data"], scored["out"], dpo_model=positive,
                                     reverse_dpo_model=negative))


def test_one_model_as_both_gives_its_own_log_probs(tiny_model, models, tmp_path):
    """softmax(2·log π − log π) = π: with the positive model as the negative one, p_ce(y_t) = π_pos(y_t)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(3))
    positive, _ = models
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", dpo_model=positive, reverse_dpo_model=positive,
                                 ce_scores=True))
    for row in read_shard_rows(tmp_path / "out"):
        for side in SIDES:
            np.testing.assert_allclose(row[f"{side}_ce_logps"], row[f"{side}_dpo_logps"], atol=TOLERANCE)


def test_ce_scores_without_a_negative_model_is_refused(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(2))
    result = run(score_command("--dataset", data, "--model", tiny_model, "--output", tmp_path / "out",
                               "--dpo-model", tiny_model, "--ce-scores", "--backend", "hf"))
    assert_one_line_error(result, "--ce-scores", "--reverse-dpo-model")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_one_model_as_both_is_said_before_scoring(tmp_path, capsys):
    """The estimate of one model against itself is that model's own log-probs: a contrast of nothing, said when the
    settings are read (as a token signal that will be 0 is), in words of cDPO's negative model."""
    from treg_data.config import ScoreConfig
    from treg_data.signals import warn_on_settings

    same = ScoreConfig(dataset="d", model="m", output="o", dpo_model="pos", reverse_dpo_model="pos", ce_scores=True)
    warn_on_settings(same)
    assert "*_ce_logps will be that model's own log-probs" in capsys.readouterr().err
    for config in (ScoreConfig(dataset="d", model="m", output="o", dpo_model="pos", reverse_dpo_model="neg",
                               ce_scores=True),
                   ScoreConfig(dataset="d", model="m", output="o", dpo_model="pos", reverse_dpo_model="pos")):
        warn_on_settings(config)
        assert "*_ce_logps" not in capsys.readouterr().err
