"""The credit-assignment benchmark: its ground truth, its AUROC, and a smoke run of the whole
thing (real vLLM scoring, real treg-train) on a barely trained model."""

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
    assert [up.misconceived(d) for d in (7, 8, 9)] == [None, None, 1]  # 9 -> 0 is right, 1 misconceived
    assert [down.misconceived(d) for d in (1, 0)] == [None, 8]  # 0 -> 9 is right, 8 misconceived


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


def test_held_out_prompts_are_never_trained_on():
    import run

    train, heldout = run.split_tasks(seed=0, train_count=500, heldout_count=30)
    assert len(world.all_tasks()) == len(set(world.all_tasks())) == 100
    assert len(set(heldout)) == 30 and not set(train) & set(heldout) and len(set(train)) == 70
    assert run.split_tasks(seed=1, train_count=5, heldout_count=30)[1] != heldout  # each seed its own split


@pytest.mark.engine
def test_smoke_run_of_the_whole_benchmark(tmp_path):
    command = [sys.executable, str(CREDIT / "run.py"), "--smoke", "--seeds", "0", "--output", str(tmp_path / "out"),
               "--model-dir", str(tmp_path / "model"), "--enforce-eager"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())["seeds"]["0"]
    stage_one = results["stage_one"]
    assert stage_one["pairs"] > 0 and stage_one["tokens_good"] > 0 and stage_one["tokens_bad"] > 0
    import run

    for method in run.METHODS:
        assert 0.0 <= results[method]["implicit_auroc"] <= 1.0 and 0.0 <= results[method]["success"] <= 1.0
        assert f"| {run.LABELS[method]} |" in result.stdout
        assert (tmp_path / "out" / "seed-0" / f"train-{method}" / "final" / "config.json").exists()
    assert "r̂ (treg-score" in result.stdout
