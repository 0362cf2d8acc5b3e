"""The credit-assignment benchmark: its ground truth, its AUROC, its statistics, and a smoke run
of the whole thing (real treg-score, real treg-train) on a barely trained model. The smoke run scores with
`--backend hf`: four vLLM starts would be most of its time, and the engine is tested on its own."""

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CREDIT = Path(__file__).resolve().parents[1] / "pipelines" / "credit"
sys.path.insert(0, str(CREDIT))
import world  # noqa: E402
from world import BAD, GOOD, NEUTRAL  # noqa: E402


def test_solutions():
    assert world.Task("up", 7, 5).solution == [7, 8, 9, 0, 1]
    assert world.Task("down", 1, 4).solution == [1, 0, 9, 8]
    assert world.Task("up", 7, 5).prompt == "count up from [7], five numbers"


def test_misconception_applies_when_a_step_crosses_zero():
    up, down = world.Task("up", 7, 5), world.Task("down", 1, 4)
    assert [up.misconceived(d) for d in (4, 6, 8, 9)] == [None, None, None, (1, 0.6)]  # 9 -> 1 skips the 0
    assert [down.misconceived(d) for d in (1, 0)] == [None, (8, 0.6)]  # 0 -> 8 skips the 9


def test_the_mixed_world_has_three_kinds_of_mistakes():
    up, down = world.Task("up", 7, 5, "mixed"), world.Task("down", 1, 4, "mixed")
    assert [up.misconceived(d) for d in (3, 4, 6, 9)] == [None, (4, 0.45), (5, 0.35), (1, 0.6)]
    assert [down.misconceived(d) for d in (4, 6, 0, 5)] == [(4, 0.45), (7, 0.35), (8, 0.6), None]
    rng = random.Random(0)
    seconds = [world.student_answer(world.Task("up", 4, 4, "mixed"), rng)[1] for _ in range(2000)]
    assert 0.42 < seconds.count(4) / 2000 < 0.48 and seconds.count(5) > seconds.count(4)  # 4,4: a habit
    assert world.hard_chars(up, "7,4,4,6,5") == [False] * 4 + [True, False] * 2 + [True]  # after a 4, 4 and 6


def test_student_makes_the_misconception_more_often_than_the_right_step():
    task, rng = world.Task("up", 9, 2), random.Random(0)
    seconds = [world.student_answer(task, rng)[1] for _ in range(2000)]
    assert seconds.count(1) > seconds.count(0) > 0


def test_worse_answers_go_wrong_about_half_of_the_time():
    task, rng = world.Task("up", 0, 6), random.Random(0)
    answers = [world.worse_answer(task, rng) for _ in range(500)]
    wrong = np.mean([world.char_labels(task, world.answer_text(a))[0].count(BAD) / 6 for a in answers])
    assert 0.4 < wrong < 0.6


def test_char_labels_judge_each_step_from_the_previous_digit():
    task = world.Task("up", 8, 3)  # 8,9,0
    labels, end = world.char_labels(task, "8,1,2")  # a wrong step, then a right step from it
    assert labels == [GOOD, NEUTRAL, BAD, NEUTRAL, GOOD] and end == NEUTRAL
    assert world.judge(task, "8,1,2") == pytest.approx(2 / 3) and not world.is_solved(task, "8,1,2")
    labels, end = world.char_labels(task, "8,9")  # stops early: the end-of-turn is the mistake
    assert labels == [GOOD, NEUTRAL, GOOD] and end == BAD
    assert world.judge(task, "8,9") == pytest.approx(1 / 3)
    labels, end = world.char_labels(task, "8,9,0,1")  # one digit too many
    assert labels[-1] == BAD and end == NEUTRAL
    labels, _ = world.char_labels(task, "8,x,0")  # after a malformed item, the right digit of the task
    assert labels == [GOOD, NEUTRAL, BAD, NEUTRAL, GOOD]
    assert world.judge(task, "8,9,0") == 1.0 and world.is_solved(task, "8,9,0") and not world.is_solved(task, "8,9,0,")


def test_token_labels_follow_the_characters_each_token_covers():
    chars, end = world.char_labels(world.Task("up", 3, 3), "3,9,0")
    labels = world.token_labels(["3", ",9", ",", "1", "<|eot|>"], chars, end)  # a token may span a comma
    assert labels.tolist() == [GOOD, BAD, NEUTRAL, GOOD, NEUTRAL]


def test_token_labels_on_the_tokenizer_of_the_benchmark(tmp_path):
    import policy
    from tiny_model import build_tokenizer
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    task = world.Task("down", 2, 4)  # 2,1,0,9
    _, ids = policy.response_ids(tokenizer, task, "2,1,7,6")
    labels = policy.labels_of(tokenizer, task, "2,1,7,6", ids)
    assert tokenizer.decode(ids) == "2,1,7,6<|eot|>" and len(ids) == 8  # one token per digit and comma
    assert (labels == BAD).sum() == 1 and (labels == GOOD).sum() == 3 and labels[-1] == NEUTRAL


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.choice([GOOD, BAD, NEUTRAL], size=40)
    good, bad = scores[labels == GOOD], scores[labels == BAD]
    pairwise = np.mean([1.0 if g > b else 0.5 if g == b else 0.0 for g, b in itertools.product(good, bad)])
    assert world.auroc(scores, labels) == pytest.approx(pairwise)
    assert world.auroc(np.array([2.0, 1.0]), np.array([GOOD, BAD])) == 1.0
    assert world.auroc(np.array([1.0, 2.0]), np.array([GOOD, BAD])) == 0.0


def test_hard_steps_are_the_zero_crossings_wherever_the_response_goes():
    task = world.Task("up", 8, 4)  # 8,9,0,1
    assert world.hard_chars(task, "8,9,0,1") == [False] * 4 + [True] + [False] * 2
    assert world.hard_chars(task, "8,9,1,2") == [False] * 4 + [True] + [False] * 2  # the misconception: hard, bad
    assert world.hard_chars(task, "8,7,8,9") == [False] * 7  # a slip: no crossing follows from its own digits
    assert world.hard_chars(world.Task("down", 1, 3), "1,0,8") == [False] * 4 + [True]
    assert world.token_flags(["8", ",9", ",", "1"], world.hard_chars(task, "8,9,1")).tolist() == [False, False, False,
                                                                                                  True]


def test_long_tasks_are_a_world_of_their_own():
    long = world.all_tasks(world.LONG)
    assert len(long) == len(set(long)) == 100 and {t.n for t in long} == set(world.LONG)
    assert world.Task("up", 3, 12).prompt == "count up from [3], twelve numbers"
    assert not set(long) & set(world.all_tasks(world.SHORT))


def test_held_out_prompts_are_never_trained_on():
    import run

    for lengths in (world.SHORT, world.LONG):
        train, heldout = run.split_tasks(seed=0, lengths=lengths, heldout_count=30)
        assert len(set(heldout)) == 30 and len(set(train)) == 70 and not set(train) & set(heldout)
        assert run.split_tasks(seed=1, lengths=lengths, heldout_count=30)[1] != heldout  # each seed its own split


def test_the_noisy_judge_swaps_a_seeded_share_and_keeps_the_order():
    import run

    rows = [{"id": str(i), "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(2000)]
    noisy = run.noisy_copy(rows, 0.25, seed=3)
    assert [r["id"] for r in noisy] == [r["id"] for r in rows]
    swapped = [r for r in noisy if r.get("swapped")]
    assert 0.22 < len(swapped) / len(rows) < 0.28
    assert all(r["chosen"] == f"r{r['id']}" and r["rejected"] == f"c{r['id']}" for r in swapped)
    assert noisy == run.noisy_copy(rows, 0.25, seed=3) and run.noisy_copy(rows, 0.0, seed=3) == rows


def test_intervals_and_paired_differences():
    import report

    mean, half = report.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5))
    per_seed = {s: {"r/dpo": {"m": 0.5 + s}, "r/dpo_reg": {"m": 0.6 + s}, "q/dpo": {"m": 0.5}, "q/dpo_reg": {"m": 0.3}}
                for s in range(3)}
    assert report.paired(per_seed, "r", "dpo_reg", "dpo", "m") == pytest.approx([0.1] * 3)
    assert report.difference([0.1, 0.1, 0.1]) == "+0.100 [+0.100, +0.100]"
    per_seed = {s: {**per_seed[s], "r/dpo": {report.PRIMARY: 0.5}, "r/dpo_reg": {report.PRIMARY: 0.6},
                    "q/dpo": {report.PRIMARY: 0.5}, "q/dpo_reg": {report.PRIMARY: 0.3}} for s in per_seed}
    assert report.largest_difference_regime(per_seed, {"r": None, "q": None}) == "q"  # |−0.2| > |+0.1|


def test_token_studies_compare_every_method_with_dpo_and_draw_them(tmp_path):
    import report
    import run

    methods = ["dpo", "dpo_reg", "tgdpo", "sepo"]
    assert report.comparisons(run.TOKEN_MIXED, methods) == [("dpo_reg", "dpo"), ("tgdpo", "dpo"), ("sepo", "dpo")]
    assert report.comparisons(run.SETTINGS, methods) == [("dpo_reg", "dpo")]
    rng = np.random.default_rng(0)
    per_seed = {s: {f"{r}/{m}": {name: float(rng.random()) for name, _ in report.METRICS}
                    for r in run.TOKEN_MIXED.regimes for m in methods} for s in range(3)}
    assert "| noisy-200 | SePO − DPO |" in report.tables(per_seed, run.TOKEN_MIXED, methods)
    report.forest({"token-mixed": (per_seed, run.TOKEN_MIXED, methods)}, tmp_path / "forest.png")
    assert (tmp_path / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smoke_run_of_the_whole_benchmark(tmp_path):
    import run

    methods = ["dpo", "dpo_reg", "dporeward_reg", "tis_dpo_models"]
    command = [sys.executable, str(CREDIT / "run.py"), "--smoke", "--seeds", "0", "--output", str(tmp_path / "out"),
               "--model-dir", str(tmp_path / "model"), "--backend", "hf", "--methods", ",".join(methods)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())["seeds"]["0"]
    for pool in run.SMOKE.pools:
        stage_one = results[f"stage_one/{pool}"]
        assert stage_one["pairs"] == run.SMOKE.pools[pool].pairs and stage_one["tokens_good"] > 0
    for regime in run.SMOKE.regimes:
        for method in methods:
            measured = results[f"{regime}/{method}"]
            assert 0.0 <= measured["implicit_auroc"] <= 1.0 and 0.0 <= measured["sampled_success"] <= 1.0
            assert f"| {regime} | {run.report.LABELS[method]} |" in result.stdout
        assert (tmp_path / "out" / "seed-0" / f"{regime}-contrastive" / "manifest.json").exists()  # both models
    assert "| pairs-16 | DPO + T-REG − DPO |" in result.stdout
    assert "| pairs-16 | DPO + DPO-reward reg. − DPO |" in result.stdout
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
