"""The scoring pipeline end to end with the transformers scorer (fast); the vLLM engine runs in
test_engine.py."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import (
    BAD_REASONS,
    bad_rows,
    hf_score_config,
    make_pairs,
    perturbed_copy,
    read_metrics,
    read_shard_rows,
    run,
    token_logprobs,
    train_command,
    write_jsonl,
)

from treg_core.contract import SCHEMA, SIDES, TOKEN_FLOAT_COLUMNS, read_shard_metadata, shard_schema
from treg_core.errors import UserError
from treg_data import pipeline
from treg_data.rewards import contrastive_rewards


@pytest.fixture
def dataset(tmp_path):
    rows = make_pairs(30)
    for offset, bad in enumerate(bad_rows()):
        rows.insert(3 + 4 * offset, bad)
    return write_jsonl(tmp_path / "pairs.jsonl", rows), rows


def test_shards_follow_the_contract(tiny_model, tokenizer, dataset, tmp_path):
    data, rows = dataset
    summary = pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out"))
    scored = read_shard_rows(tmp_path / "out")
    good_ids = [r["id"] for r in rows if r["id"] not in BAD_REASONS]
    assert [r["id"] for r in scored] == good_ids  # input order, bad rows left out
    assert summary.pairs_read == len(rows) and summary.pairs_scored == len(good_ids)
    assert summary.skipped_by_reason == {reason: list(BAD_REASONS.values()).count(reason)
                                         for reason in set(BAD_REASONS.values())}

    shards = sorted((tmp_path / "out" / "data").glob("*.parquet"))
    assert [pq.ParquetFile(s).metadata.num_rows for s in shards] == [8, 8, 8, 6]
    assert pq.ParquetFile(shards[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_schema(shards[0]).remove_metadata() == SCHEMA
    for row in scored:
        assert row["prompt_ids"] and row["chosen"][0]["role"] == "assistant"
        for side in SIDES:
            n = len(row[f"{side}_ids"])
            assert n > 0 and all(len(row[f"{side}_{c}"]) == n for c in TOKEN_FLOAT_COLUMNS)
            assert all(lp < 0 for lp in row[f"{side}_ref_logps"])
            expected = contrastive_rewards(np.array(row[f"{side}_better_logps"]), np.array(row[f"{side}_worse_logps"]))
            np.testing.assert_allclose(row[f"{side}_rewards"], expected, atol=1e-7)
        assert tokenizer.decode(row["chosen_ids"]) == row["chosen"][0]["content"] + "<|eot|>"

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["pairs_scored"] == len(good_ids)
    assert manifest["counts"]["skipped_by_reason"] == summary.skipped_by_reason
    assert manifest["provenance"]["revision_prompts"]["better"].startswith("Below is a conversation")
    assert manifest["provenance"]["reward_transform"] == "sigmoid(better_logps - worse_logps) - 0.5"
    assert len(manifest["provenance"]["tokenizer_hash"]) == 64
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"]: s["reason"] for s in skipped} == BAD_REASONS
    assert read_shard_metadata(shards[0]).provenance.to_dict() == manifest["provenance"]


class _Crash(Exception):
    pass


def test_resume_after_a_crash_gives_the_uninterrupted_rows(tiny_model, dataset, tmp_path, monkeypatch):
    data, _ = dataset
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "whole"))

    real_build = pipeline.build_scorer

    def crashing_build(backend, options):
        scorer, calls = real_build(backend, options), [0]
        real_score = scorer.score

        def score(requests):
            calls[0] += 1
            if calls[0] == 4:
                raise _Crash()
            return real_score(requests)

        scorer.score = score
        return scorer

    monkeypatch.setattr(pipeline, "build_scorer", crashing_build)
    with pytest.raises(_Crash):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "resumed"))
    monkeypatch.undo()
    data_dir = tmp_path / "resumed" / "data"
    assert len(list(data_dir.glob("*.parquet"))) == 1 and not (tmp_path / "resumed" / "manifest.json").exists()
    (data_dir / ".train-00000-of-00001-00001.parquet.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves

    summary = pipeline.run(hf_score_config(tiny_model, data, tmp_path / "resumed"))
    assert not list(data_dir.glob(".*"))
    assert read_shard_rows(tmp_path / "resumed") == read_shard_rows(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert resumed["counts"] == whole["counts"] and summary.pairs_scored == whole["counts"]["pairs_scored"]


def test_other_settings_are_refused_unless_overwrite(tiny_model, dataset, tmp_path):
    data, _ = dataset
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out"))
    with pytest.raises(UserError, match="max_length"):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", max_length=200))
    summary = pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", max_length=200, overwrite=True))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["provenance"]["max_length"] == 200
            and summary.pairs_scored == len(read_shard_rows(tmp_path / "out")))


def test_rerun_of_a_finished_run_scores_nothing(tiny_model, dataset, tmp_path, monkeypatch):
    data, _ = dataset
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out"))
    before = read_shard_rows(tmp_path / "out")
    monkeypatch.setattr(pipeline, "build_scorer", lambda *a: pytest.fail("a finished run must not start a scorer"))
    summary = pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out"))
    assert summary.tokens == 0 and read_shard_rows(tmp_path / "out") == before


def test_workers_write_one_dataset_covering_every_row_once(tiny_model, dataset, tmp_path):
    data, rows = dataset
    out = tmp_path / "split"
    summaries = [pipeline.run(hf_score_config(tiny_model, data, out, num_workers=3, worker_index=i)) for i in (2, 0, 1)]
    assert [s.manifest is not None for s in summaries] == [False, False, True]
    ids = [r["id"] for r in read_shard_rows(out)]
    assert ids == [r["id"] for r in rows if r["id"] not in BAD_REASONS]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pairs_read"] == len(rows)
    assert manifest["counts"]["pairs_skipped"] == len(BAD_REASONS)
    with pytest.raises(UserError, match="num_workers"):
        pipeline.run(hf_score_config(tiny_model, data, out))


def test_strict_fails_on_the_first_bad_row_with_its_id(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(2) + bad_rows()[:1])
    with pytest.raises(UserError, match=r"bad-missing.*missing_field"):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", strict=True))


def test_scorer_with_another_vocabulary_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    from tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", vocab_size=600)
    monkeypatch.setattr(pipeline, "open_source", lambda *a: pytest.fail("no data may be read"))
    with pytest.raises(UserError, match="different vocabulary"):
        pipeline.run(hf_score_config(tiny_model, "unused", tmp_path / "out", scorer_model=str(other)))


def test_dpo_rewards_against_another_scorer_are_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "open_source", lambda *a: pytest.fail("no data may be read"))
    with pytest.raises(UserError, match="--dpo-model needs the reference log-probs of --model"):
        pipeline.run(hf_score_config(tiny_model, "unused", tmp_path / "out", scorer_model=str(tmp_path / "other"),
                                     dpo_model=tiny_model))


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        pipeline.run(hf_score_config(str(tmp_path / "nope"), "unused", tmp_path / "out"))


def test_tokenizer_without_chat_template_needs_one_from_a_file(tiny_model, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(2))
    with pytest.raises(UserError, match="--chat-template"):
        pipeline.run(hf_score_config(str(bare), data, tmp_path / "o1"))
    template = tmp_path / "template.jinja"
    template.write_text((Path(tiny_model) / "chat_template.jinja").read_text())
    summary = pipeline.run(hf_score_config(str(bare), data, tmp_path / "o2", chat_template=str(template)))
    assert summary.pairs_scored == 2


# ---- --dpo-model: token rewards from a DPO-trained model (paper Table 2, "DPO reward") -------------


@pytest.fixture(scope="module")
def dpo_model(tiny_model, tmp_path_factory):
    return perturbed_copy(tiny_model, tmp_path_factory.mktemp("dpo") / "tiny-dpo", seed=1)


@pytest.fixture(scope="module")
def contrastive_scored(tiny_model, dpo_model, tmp_path_factory):
    """16 pairs scored with --dpo-model and --reverse-dpo-model (two perturbed copies of the tiny model)."""
    root = tmp_path_factory.mktemp("contrastive")
    reverse = perturbed_copy(tiny_model, root / "tiny-reverse-dpo", seed=2)
    data = write_jsonl(root / "d.jsonl", make_pairs(16))
    pipeline.run(hf_score_config(tiny_model, data, root / "out", dpo_model=dpo_model, reverse_dpo_model=reverse))
    return root / "out", reverse


def test_dpo_columns_are_the_models_own_log_probs_and_their_rewards(dpo_model, contrastive_scored):
    folder, reverse = contrastive_scored
    rows = read_shard_rows(folder)
    shard = sorted((folder / "data").glob("*.parquet"))[0]
    assert pq.read_schema(shard).remove_metadata() == shard_schema(dpo=True, reverse_dpo=True)
    provenance = read_shard_metadata(shard).provenance
    assert (provenance.dpo_model, provenance.reverse_dpo_model) == (dpo_model, reverse)
    largest = 0.0
    for side in SIDES:
        for row, logps, reverse_logps in zip(rows, token_logprobs(dpo_model, rows, side),
                                             token_logprobs(reverse, rows, side)):
            np.testing.assert_allclose(row[f"{side}_dpo_logps"], logps, atol=1e-5)  # lossless: the raw log-probs
            np.testing.assert_allclose(row[f"{side}_rev_dpo_logps"], reverse_logps, atol=1e-5)
            expected = 1 / (1 + np.exp(-(logps - np.array(row[f"{side}_ref_logps"], dtype=np.float64)))) - 0.5
            np.testing.assert_allclose(row[f"{side}_dpo_rewards"], expected, atol=1e-5)
            largest = max(largest, float(np.abs(row[f"{side}_dpo_rewards"]).max()))
    assert largest > 1e-3  # the two models differ, so their log-ratio does too


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["tgdpo", "sepo", "tis_dpo"])
def test_the_dpo_model_methods_train_on_those_columns(tiny_model, contrastive_scored, loss, tmp_path):
    extra = ["--tis-dpo-weights", "models"] if loss == "tis_dpo" else []
    result = run(train_command("--model", tiny_model, "--data", contrastive_scored[0], "--output", tmp_path / loss,
                               "--loss", loss, "--global-batch-size", "8", "--max-steps", "2", "--logging-steps", "1",
                               "--save-steps", "0", "--learning-rate", "1e-4", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path / loss)
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)


def test_a_reverse_dpo_model_alone_is_refused(tiny_model, dpo_model, tmp_path):
    with pytest.raises(UserError, match="--reverse-dpo-model is one half of a contrastive pair"):
        pipeline.run(hf_score_config(tiny_model, "unused", tmp_path / "out", reverse_dpo_model=dpo_model))


def test_dpo_rewards_of_the_model_itself_are_zero(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(10))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", dpo_model=tiny_model))
    for row in read_shard_rows(tmp_path / "out"):
        for side in SIDES:
            assert len(row[f"{side}_dpo_rewards"]) == len(row[f"{side}_ids"])
            np.testing.assert_allclose(row[f"{side}_dpo_rewards"], 0.0, atol=1e-6)


def test_dpo_model_is_part_of_the_recorded_settings(tiny_model, dpo_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(4))
    pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out"))
    assert "dpo_rewards" not in "".join(pq.read_schema(sorted((tmp_path / "out" / "data").glob("*.parquet"))[0]).names)
    with pytest.raises(UserError, match="dpo_model"):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "out", dpo_model=dpo_model))


def test_dpo_model_with_another_vocabulary_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    from tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", vocab_size=600)
    monkeypatch.setattr(pipeline, "open_source", lambda *a: pytest.fail("no data may be read"))
    monkeypatch.setattr(pipeline, "build_scorer", lambda *a: pytest.fail("no engine may start"))
    with pytest.raises(UserError, match="--dpo-model .* different vocabulary"):
        pipeline.run(hf_score_config(tiny_model, "unused", tmp_path / "out", dpo_model=str(other)))
