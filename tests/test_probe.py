"""The reward check (treg-probe, treg-score's check and --revision-prompts auto) and edit-diff token rewards:
the metric against hand computations, the request wiring against a scorer whose answer is known, and the
commands end to end on a tiny model with the transformers scorer (the vLLM path: tests/test_engine.py)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import hf_score_config, make_pairs, probe_command, run, score_command, train_command, write_jsonl

from treg_core.contract import read_manifest, shard_files
from treg_core.errors import BadRow, UserError
from treg_data import pipeline
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- hostile inputs: refused in one line, or left out with a reason ---------------------------------------


class _FlatScorer:
    """Every token -1 after every context: r̂ is 0 everywhere, so a set's check is weak and the others are measured."""

    def score(self, requests):
        return [np.full(len(response), -1.0, dtype=np.float32) for _, response in requests]


def _items(rows):
    from treg_data.pairs import Columns, parse_pair
    from treg_data.probe import ProbeItem

    return [ProbeItem(parse_pair(row, Columns()), "k") for row in rows]


def test_pairs_whose_rejected_answer_has_no_measurable_edit_are_left_out(tokenizer):
    from treg_data.probe import NoProbePair

    edit = {"prompt": "Name a colour.", "chosen": "The colour is red today.", "rejected": "The colour is blue today."}
    deletion = {"prompt": "Copy: one two three", "chosen": "one two three", "rejected": "one three"}
    whole = {"prompt": "Name a metal.", "chosen": "Copper", "rejected": "I cannot help with that."}
    encoders = {"truthful": PairEncoder(tokenizer, SHIPPED["truthful"], LIMITS)}
    result = probe(_items([edit, deletion, whole]), encoders, _FlatScorer(), samples=50)
    assert result["pairs"] == 1 and result["skipped"] == {"no_edit": 1, "whole_answer_edited": 1}
    assert not np.isnan(result["sets"]["truthful"]["auroc"])
    with pytest.raises(NoProbePair, match="no_edit.*changes a span inside text"):  # once NaN, printed as success
        probe(_items([deletion]), encoders, _FlatScorer(), samples=50)


def test_a_probe_file_says_which_row_is_wrong_and_refuses_odd_kinds(tmp_path):
    rows = [{"prompt": "Q?", "chosen": "It is red.", "rejected": "It is blue.", "kind": kind}
            for kind in ("fact", ["a", "b"], None, 3)]
    items, skipped = load_probe_pairs(write_jsonl(tmp_path / "kinds.jsonl", rows))
    assert [i.kind for i in items] == ["fact", "all", "3"] and skipped == {"malformed_field": 1}
    (tmp_path / "broken.jsonl").write_bytes(b'{"prompt": "Q?", "chosen": "\xff"}\n')
    with pytest.raises(UserError, match=r"row 1: invalid_json: .*utf-8.*give rows with prompt, chosen and rejected"):
        load_probe_pairs(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="--pairs") as empty:
        load_probe_pairs(tmp_path / "empty.jsonl")
    assert "--dataset" not in str(empty.value)


@pytest.mark.parametrize("text, message", [
    ("better: '{prompt} Be right.'\nworse: '{prompt} Be right.'\n", "the same text, so every token reward would be 0"),
    ("better: '{prompt} a'\nworse: '{prompt} b'\nbetter: 'c'\n", "better given twice .line 1"),
    ('better: "{prompt}\n', r"found unexpected end of stream \(line 2, column 1\); fix the YAML"),
])
def test_prompt_set_files_that_cannot_work_are_refused_in_one_line(tmp_path, text, message):
    from treg_data.revision_prompts import load_revision_prompts

    (tmp_path / "set.yaml").write_text(text)
    with pytest.raises(UserError, match=message) as refused:
        load_revision_prompts(tmp_path / "set.yaml")
    assert "\n" not in str(refused.value)


def test_prompt_set_files_not_utf8_named_like_a_shipped_set_or_with_a_mistyped_placeholder(tmp_path, monkeypatch,
                                                                                          capsys):
    from treg_data.revision_prompts import load_revision_prompts

    (tmp_path / "latin1.yaml").write_bytes("better: '{prompt} café'\nworse: '{prompt} x'\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8; save the file as UTF-8"):
        load_revision_prompts(tmp_path / "latin1.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "truthful").write_text("better: '{prompt} a'\nworse: '{prompt} b'\n")
    with pytest.raises(UserError, match=r"names both a shipped set and a file here; give the file as \./truthful"):
        load_revision_prompts("truthful")
    assert load_revision_prompts("./truthful").better == "{prompt} a"
    (tmp_path / "typo.yaml").write_text('better: "{prompt} Fix: {answer} {\\"a\\": 1}"\nworse: "{prompt} {answer}"\n')
    assert load_revision_prompts("typo.yaml").better.endswith('{answer} {"a": 1}')  # braces stay text...
    assert "{answer} is kept as written, not filled in" in capsys.readouterr().err  # ...but a near-placeholder is said


@pytest.mark.parametrize("settings, message", [
    ({"output": "{tmp}"}, "is a folder"),
    ({"output": "{tmp}/pairs.jsonl"}, "exists and is not a treg-probe result"),
    ({"dpo_model": "{model}/"}, "is --model itself"),
    ({"revision_prompts": "auto"}, "treg-probe measures every shipped set already"),
    ({"bootstrap": 10}, "at least 50"),
    ({"gpu_memory_utilization": 2.0}, r"in \(0, 1\]"),
])
def test_treg_probe_refuses_settings_before_any_work(tiny_model, tmp_path, settings, message):
    from treg_data import probe_cli

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "It is red.", "rejected": "It is blue."}])
    before = (tmp_path / "pairs.jsonl").read_text()
    settings = {k: v.format(tmp=tmp_path, model=tiny_model) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(UserError, match=message):
        probe_cli.run(probe_cli.ProbeConfig(model=tiny_model, pairs=pairs, backend="hf", dtype="float32",
                                            **{"bootstrap": 50, **settings}))
    assert (tmp_path / "pairs.jsonl").read_text() == before  # the pairs were never replaced by the result


def test_treg_probe_says_when_the_chat_template_refuses_every_conversation(tiny_model, tmp_path):
    from treg_data import probe_cli

    template = tmp_path / "refuses.jinja"
    template.write_text("{% for m in messages %}{{ raise_exception('no system role') }}{% endfor %}")
    with pytest.raises(UserError, match="no system role; fix the template or give another with --chat-template"):
        probe_cli.run(probe_cli.ProbeConfig(model=tiny_model, chat_template=str(template), backend="hf", bootstrap=50))
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4))  # treg-score says so too, before any engine starts
    with pytest.raises(UserError, match="no system role; fix the template or give another with --chat-template"):
        pipeline.run(hf_score_config(tiny_model, data, tmp_path / "scored", chat_template=str(template)))


def test_the_reward_check_names_treg_scores_flags_and_goes_on_when_a_set_fits_nothing(tokenizer, capsys):
    from treg_data.reward_check import run_check

    # 120 tokens: truthful and instruct fit most probe pairs, revision and examples (longer prompts) none.
    fits_some = LengthLimits(max_length=120, max_prompt_length=120, max_model_len=120)
    used, record = run_check(_FlatScorer(), tokenizer, fits_some, SHIPPED["truthful"])
    assert used == SHIPPED["truthful"] and set(record["sets"]) == {"truthful", "instruct"}
    assert "do not locate errors" in capsys.readouterr().err
    nothing_fits = LengthLimits(max_length=20, max_prompt_length=20, max_model_len=20)
    assert run_check(_FlatScorer(), tokenizer, nothing_fits, SHIPPED["truthful"]) == (SHIPPED["truthful"], None)
    assert "not run" in (err := capsys.readouterr().err) and "raise --max-model-len" in err and "--pairs" not in err
    with pytest.raises(UserError, match="auto: .*raise --max-model-len, or name a set"):
        run_check(_FlatScorer(), tokenizer, nothing_fits, None)


@pytest.mark.parametrize("settings, message", [
    ({"loss_type": "sepo"}, "weights tokens its own way"),  # else plain SimPO under SePO's name
    ({"loss_type": "d2po", "weighting": "none"}, "weights tokens its own way"),
    ({"loss_type": "dpo", "beta": 0.0}, "beta must be a finite number above 0"),
    ({"loss_type": "dpo", "beta": float("nan")}, "beta must be"),
    ({"loss_type": "sepo", "weighting": "sepo", "sepo_ratio": 0.0}, r"sepo_ratio must be a finite number in \(0, 1\]"),
    ({"loss_type": "dpo_reg", "weighting": "d2po", "d2po_discount": 1.5}, "d2po_discount must be"),
    ({"loss_type": "dpo", "weighting": "nonesuch"}, "unknown token weighting"),
])
def test_loss_settings_that_no_objective_means_are_refused_when_made(settings, message):
    from treg_train.losses import LossSettings

    with pytest.raises(ValueError, match=message):
        LossSettings(**settings)
    LossSettings("sepo", beta=1.0, weighting="sepo", sepo_ratio=1.0)  # the edges that mean something stay allowed
    LossSettings("d2po", weighting="d2po", d2po_discount=1.0, alpha=0.0, gamma=-3.0)


def test_answers_that_differ_only_where_the_chat_template_trims_are_no_pair(tiny_model):
    from pathlib import Path

    from transformers import AutoTokenizer

    trimming = AutoTokenizer.from_pretrained(tiny_model)  # Llama-3's template trims each message's content
    trimming.chat_template = (Path(__file__).parent / "chat_templates" / "llama3.jinja").read_text()
    spaced = {"prompt": "What colour is it?", "chosen": "It is red.", "rejected": "It is red.  "}
    edit = {"prompt": "What colour is it?", "chosen": "It is red today.", "rejected": "It is blue today."}
    limits = LengthLimits(max_length=1024, max_prompt_length=512, max_model_len=2048)  # its system block is long
    with pytest.raises(BadRow, match="identical_responses: the two answers have the same tokens"):
        PairEncoder(trimming, None, limits).encode(_items([spaced])[0].pair)  # every mode, edit-diff included
    encoders = {"truthful": PairEncoder(trimming, SHIPPED["truthful"], limits)}
    result = probe(_items([spaced, edit]), encoders, _FlatScorer(), samples=50)
    assert result["pairs"] == 1 and result["skipped"] == {"identical_responses": 1}
