"""The reward check (treg-probe, treg-score's check and --revision-prompts auto) and edit-diff token rewards:
the metric against hand computations, the request wiring against a scorer whose answer is known, and the
commands end to end on a tiny model with the transformers scorer (the vLLM path: tests/test_engine.py)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import probe_command, run, score_command, train_command, write_jsonl

from treg_core.contract import read_manifest, shard_files
from treg_core.errors import UserError
from treg_data.edits import common_ends, edit_diff_rewards, edited_mask, not_near_edit
from treg_data.encoding import PairEncoder
from treg_data.hub import write_card
from treg_data.lengths import LengthLimits
from treg_data.probe import (
    BASELINE,
    Scored,
    auroc,
    load_probe_pairs,
    lowest_on_edit,
    probe,
    summary,
    warn_if_weak,
)
from treg_data.revision_prompts import SHIPPED

LIMITS = LengthLimits(max_length=256, max_prompt_length=128, max_model_len=640)


# ---- the metric, by hand -------------------------------------------------------------------------------


def test_edited_tokens_are_outside_the_common_prefix_and_suffix():
    assert common_ends([1, 2, 3, 9, 5], [1, 2, 4, 5]) == (2, 1)
    assert edited_mask([1, 2, 3, 9, 5], [1, 2, 4, 5]).tolist() == [False, False, True, True, False]
    # A deletion: the suffix may not overlap the prefix, so the longer answer's extra token is the edit.
    assert edited_mask([7, 7, 7], [7, 7]).tolist() == [False, False, True]
    assert edited_mask([7, 7], [7, 7, 7]).tolist() == [False, False]


def test_auroc_counts_ties_as_half():
    # positives score 2 and 3, negatives 1 and 2: (2>1) + (2=2)/2 + (3>1) + (3>2) = 3.5 of 4 comparisons
    assert auroc(np.array([1.0, 2, 2, 3]), np.array([False, True, False, True])) == pytest.approx(0.875)
    assert auroc(np.array([5.0, 5, 5]), np.array([True, False, False])) == pytest.approx(0.5)
    assert np.isnan(auroc(np.array([1.0, 2]), np.array([True, True])))


def test_lowest_on_edit_shares_the_credit_of_a_tie():
    assert lowest_on_edit(Scored(np.array([0.0, -1, -1]), np.array([False, True, False]), "k")) == 0.5
    assert lowest_on_edit(Scored(np.array([0.0, -1, 2]), np.array([False, True, False]), "k")) == 1.0


def test_summary_is_pooled_and_its_interval_holds_it():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(30):
        edited = np.zeros(8, dtype=bool)
        edited[rng.integers(0, 8)] = True
        pairs.append(Scored(np.where(edited, -0.3, 0.0) + rng.normal(0, 0.2, 8), edited, "k"))
    result = summary(pairs, samples=200)
    pooled = auroc(-np.concatenate([p.rewards for p in pairs]), np.concatenate([p.edited for p in pairs]))
    assert result["auroc"] == pytest.approx(pooled, abs=1e-4) and result["auroc"] > 0.8
    assert result["ci"][0] <= result["auroc"] <= result["ci"][1]
    assert summary(pairs, samples=200) == result  # seeded


def test_the_warning_names_a_better_set_only_when_the_interval_is_low():
    weak, good = {"auroc": 0.5, "ci": [0.45, 0.55]}, {"auroc": 0.8, "ci": [0.7, 0.9]}
    assert warn_if_weak("a", good) is None
    assert "--revision-prompts b" in warn_if_weak("a", weak, {"a": weak, "b": good})
    assert "edit-diff" in warn_if_weak("a", weak, {"a": weak})
    assert "edit-diff" in warn_if_weak("a", weak, {"a": weak, "b": {"auroc": 0.52, "ci": [0.5, 0.55]}})  # weak too


def test_edit_diff_rewards_and_the_near_edit_rule():
    chosen, rejected = edit_diff_rewards([1, 2, 3, 4], [1, 2, 9, 9, 4])
    assert chosen.tolist() == [0, 0, 0.5, 0] and rejected.tolist() == [0, 0, -0.5, -0.5, 0]
    assert not_near_edit([1, 2, 3, 4], [1, 2, 9, 4], max_edit_tokens=1) is None
    assert "max-edit-tokens 1" in not_near_edit([1, 2, 3, 4], [1, 9, 9, 4], max_edit_tokens=1)
    assert "more than half" in not_near_edit([1, 2, 3, 4], [9, 9, 9, 4], max_edit_tokens=8)


# ---- the wiring: a scorer that knows the answer ----------------------------------------------------------


class _KnowingScorer:
    """Log-probs after a context: -0.2 on a rejected answer's edited tokens when the context holds `worse`'s text,
    else -1; the policy prompt gives every token -2. A set whose reward follows this finds every edit."""

    def __init__(self, tokenizer, encoder, items, worse_text: str):
        self.tokenizer, self.worse_text = tokenizer, worse_text
        encoded = [encoder.encode(item.pair) for item in items]
        self.edited = {tuple(e.rejected.ids): edited_mask(e.rejected.ids, e.chosen.ids) for e in encoded}

    def score(self, requests):
        out = []
        for prefix, response in requests:
            text = self.tokenizer.decode(prefix)
            logps = np.full(len(response), -1.0 if "Answer" in text else -2.0, dtype=np.float32)
            if self.worse_text in text and tuple(response) in self.edited:
                logps[self.edited[tuple(response)]] = -0.2
            out.append(logps)
        return out


def test_probe_reads_each_sets_rewards_from_its_own_requests(tokenizer):
    items, skipped = load_probe_pairs()
    assert len(items) >= 150 and not skipped
    assert {item.kind for item in items} == {"fact", "arithmetic", "format", "reasoning"}
    items = [i for i in items if i.kind == "fact"][:12]
    encoders = {name: PairEncoder(tokenizer, SHIPPED[name], LIMITS) for name in ("truthful", "instruct")}
    scorer = _KnowingScorer(tokenizer, encoders["truthful"], items, SHIPPED["truthful"].worse)
    result = probe(items, encoders, scorer, samples=50)
    assert result["sets"]["truthful"]["auroc"] == 1.0 and result["sets"]["truthful"]["lowest_on_edit"] == 1.0
    assert result["sets"]["instruct"]["auroc"] == 0.5  # equal log-probs in both contexts: all ties
    assert result[BASELINE]["auroc"] == 0.5 and result["best"] == "truthful" and result["pairs"] == 12
    assert set(result["sets"]["truthful"]["by_kind"]) == {"fact"}


# ---- the commands, end to end (transformers scorer) ------------------------------------------------------


@pytest.fixture(scope="module")
def probe_pairs(tmp_path_factory):
    items = [json.loads(line) for line in open(load_probe_pairs.__globals__["SHIPPED_PAIRS"], encoding="utf-8")]
    by_kind = {}
    for item in items:
        by_kind.setdefault(item["kind"], []).append(item)
    chosen = [row for rows in by_kind.values() for row in rows[:3]]
    far = {"id": "far", "kind": "fact", "prompt": "Say something.", "chosen": "The sky is blue today.",
           "rejected": "Cats and dogs are both common pets that many people keep at home."}
    return write_jsonl(tmp_path_factory.mktemp("probe") / "pairs.jsonl", chosen + [far])


def test_treg_probe_prints_a_table_and_the_json_last(tiny_model, probe_pairs, tmp_path):
    sets = tmp_path / "mine.yaml"
    sets.write_text("better: 'Be right. {prompt}'\nworse: 'Be wrong. {prompt}'\n")
    result = run(probe_command("--model", tiny_model, "--backend", "hf", "--dtype", "float32", "--pairs", probe_pairs,
                               "--revision-prompts", sets, "--bootstrap", "50", "--output", tmp_path / "probe.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last) >= {"sets", BASELINE, "best", "pairs"} and last["pairs"] == 13
    assert set(last["sets"]) == set(SHIPPED) | {"mine.yaml"} and last["best"] in last["sets"]
    for source in [*last["sets"].values(), last[BASELINE]]:
        assert 0 <= source["ci"][0] <= source["ci"][1] <= 1 and 0 <= source["auroc"] <= 1
        assert set(source["by_kind"]) == {"fact", "arithmetic", "format", "reasoning"}
    assert "AUROC" in result.stdout.splitlines()[0]
    assert json.loads((tmp_path / "probe.json").read_text()) == last


def test_treg_probe_refuses_a_file_without_pairs(tiny_model, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "x", "chosen": "", "rejected": "y"}])
    result = run(probe_command("--model", tiny_model, "--backend", "hf", "--pairs", empty))
    assert result.returncode != 0 and "no usable pair" in result.stderr


def test_treg_score_checks_its_rewards_and_records_the_check(tiny_model, probe_pairs, tmp_path):
    base = ["--model", tiny_model, "--dataset", probe_pairs, "--backend", "hf", "--dtype", "float32"]
    checked = run(score_command(*base, "--output", tmp_path / "checked", "--reward-check"))
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "reward check: AUROC" in checked.stderr and "(set revision)" in checked.stderr
    manifest = read_manifest(tmp_path / "checked")
    assert manifest.reward_check["used"] == "revision" and manifest.reward_check["pairs"] >= 150
    if manifest.reward_check["sets"]["revision"]["ci"][1] < 0.6:  # a random model: the warning, with its options
        assert "the token rewards of 'revision' do not locate errors" in checked.stderr
        assert set(manifest.reward_check["sets"]) == set(SHIPPED)
    card = write_card(tmp_path / "checked", "me/checked").read_text()
    assert "located the edited tokens with an AUROC of" in card and "| arithmetic |" in card
    auto = run(score_command(*base, "--output", tmp_path / "auto", "--revision-prompts", "auto"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    chosen = read_manifest(tmp_path / "auto").reward_check["best"]
    assert f"--revision-prompts auto: chose {chosen!r}" in auto.stderr
    assert read_manifest(tmp_path / "auto").provenance.revision_prompts == SHIPPED[chosen].as_dict()
    unchecked = run(score_command(*base, "--output", tmp_path / "unchecked"))
    assert unchecked.returncode == 0 and "reward check" not in unchecked.stderr
    assert read_manifest(tmp_path / "unchecked").reward_check is None


def test_edit_diff_rewards_end_to_end(tiny_model, probe_pairs, tmp_path):
    scored = tmp_path / "scored"
    result = run(score_command("--model", tiny_model, "--dataset", probe_pairs, "--backend", "hf", "--dtype",
                               "float32", "--output", scored, "--token-rewards", "edit-diff", "--reward-check"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward check" not in result.stderr  # labels, not a model's judgement: nothing to check
    manifest = read_manifest(scored)
    assert manifest.counts.skipped_by_reason.get("not_near_edit", 0) >= 1  # the pair "far" at least
    assert manifest.provenance.token_rewards == "edit-diff" and manifest.provenance.revision_prompts == {}
    card = write_card(scored, "me/edits").read_text()
    assert "edit-diff: +0.5" in card and "Not run" in card and "x_better" not in card
    table = pq.read_table(shard_files(scored)[0])
    assert "chosen_better_logps" not in table.column_names
    for row in table.to_pylist():
        chosen, rejected = edit_diff_rewards(row["chosen_ids"], row["rejected_ids"])
        assert row["chosen_rewards"] == chosen.tolist() and row["rejected_rewards"] == rejected.tolist()
        assert min(row["rejected_rewards"]) == -0.5 and len(row["rejected_ref_logps"]) == len(row["rejected_ids"])
    wider = run(score_command("--model", tiny_model, "--dataset", probe_pairs, "--backend", "hf", "--dtype",
                              "float32", "--output", scored, "--token-rewards", "edit-diff", "--max-edit-tokens", "40"))
    assert wider.returncode != 0 and "reward_transform" in wider.stderr  # another near-edit rule: not mixed in
    trained = run(train_command("--model", tiny_model, "--data", scored, "--output", tmp_path / "run", "--loss",
                                "dpo_reg", "--max-steps", "2", "--global-batch-size", "4"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    refused = run(train_command("--model", tiny_model, "--data", scored, "--output", tmp_path / "tis", "--loss",
                                "tis_dpo", "--max-steps", "2", "--global-batch-size", "4"))
    assert refused.returncode != 0 and "--token-rewards contrastive" in refused.stderr


@pytest.mark.parametrize("settings, message", [
    ({"token_rewards": "edit-diff", "revision_prompts": "truthful"}, "leave out --revision-prompts"),
    ({"revision_prompts": "auto", "reward_check": False}, "chooses by the reward check"),
    ({"token_rewards": "diff"}, "--token-rewards must be one of"),
    ({"revision_prompts": "nonesuch"}, "neither a shipped set"),
])
def test_settings_that_cannot_work_are_refused(tiny_model, tmp_path, settings, message):
    from treg_data.config import ScoreConfig, validate
    from treg_data.pipeline import candidate_prompt_sets

    config = ScoreConfig(model=tiny_model, dataset="x.jsonl", output=str(tmp_path / "o"), **settings)
    with pytest.raises(UserError, match=message):
        candidate_prompt_sets(validate(config))
