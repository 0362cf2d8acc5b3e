"""A task world where every response token's quality is known.

A prompt asks to count up or down from a digit, mod 10, for n numbers ("count up from [8], five
numbers" -> "8,9,0,1,2"): four to eight numbers (SHORT), or twelve to sixteen (LONG), where one
wrong step hides among many right ones. Each step is checked on its own: a digit is right when it is the
previous digit of the same response plus (or minus) one, so one wrong step does not condemn the
steps after it. Every token is labelled good (a right step), bad (a wrong
step, a digit too many, or an end-of-turn that comes too early) or neutral (commas, the
end-of-turn of a full answer). Every digit and comma is one token.

Three kinds of text are drawn from it, for the model that `build_model.py` trains:
- policy answers with the mistakes of a mediocre student: random slips, and misconceptions
  where they apply (MISCONCEPTIONS: in the world `zero` a step across zero skips it, 9,1 and 0,8,
  more likely than the right step; the world `mixed` adds a repeated 4 and a wrong direction after
  a 6, less likely than the right step but far more than a slip), so even greedy answers are often
  wrong;
- "better" revisions: the right answer, whatever draft is quoted;
- "worse" revisions: answers where every step goes wrong half of the time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

GOOD, BAD, NEUTRAL = 1, -1, 0
# The revision prompts of this world (treg-score --revision-prompts). Short, and worded in the
# tokenizer's own words, so the model that learns them trains in minutes on a CPU.
REVISION_PROMPTS = {
    "better": "make the answer correct:\n{prompt}\n{response}",
    "worse": "make the answer incorrect:\n{prompt}\n{response}",
}
SLIP = 0.06  # chance of a random wrong step, anywhere
# Per world, the student's misconceptions and the chance of each where it applies: "skip" across zero (9,1 up,
# 0,8 down), "repeat" a 4 (4,4), "reverse" after a 6 (6,5 up, 6,7 down).
MISCONCEPTIONS = {"zero": {"skip": 0.6}, "mixed": {"skip": 0.6, "repeat": 0.45, "reverse": 0.35}}
WORSE_SLIP = 0.5  # chance of a wrong step in a "worse" revision
NUMBER_WORDS = {4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                12: "twelve", 13: "thirteen", 14: "fourteen", 15: "fifteen", 16: "sixteen"}
SHORT, LONG = (4, 5, 6, 7, 8), (12, 13, 14, 15, 16)


@dataclass(frozen=True)
class Task:
    direction: str  # "up" or "down"
    start: int
    n: int
    world: str = "zero"  # a key of MISCONCEPTIONS

    @property
    def prompt(self) -> str:
        # n in words, brackets around the start: every number is then one token of its own.
        return f"count {self.direction} from [{self.start}], {NUMBER_WORDS[self.n]} numbers"

    def step(self, previous: int) -> int:
        return (previous + 1 if self.direction == "up" else previous - 1) % 10

    def misconceived(self, previous: int) -> tuple[int, float] | None:
        """The wrong step a mediocre student of this world prefers after `previous`, and its chance."""
        kinds, up = MISCONCEPTIONS[self.world], self.direction == "up"
        if "skip" in kinds and previous == (9 if up else 0):
            return (1 if up else 8), kinds["skip"]  # 9,1 / 0,8: skips the zero / the nine
        if "repeat" in kinds and previous == 4:
            return 4, kinds["repeat"]
        if "reverse" in kinds and previous == 6:
            return (5 if up else 7), kinds["reverse"]
        return None

    @property
    def solution(self) -> list[int]:
        digits = [self.start]
        while len(digits) < self.n:
            digits.append(self.step(digits[-1]))
        return digits


def all_tasks(lengths: tuple[int, ...] = SHORT, world: str = "zero") -> list[Task]:
    """The world of one length set: 100 prompts."""
    return [Task(d, start, n, world) for d in ("up", "down") for start in range(10) for n in lengths]


def random_task(rng: random.Random, lengths: tuple[int, ...] = SHORT, world: str = "zero") -> Task:
    return Task(rng.choice(("up", "down")), rng.randrange(10), rng.choice(lengths), world)


def answer_text(digits: list[int]) -> str:
    return ",".join(map(str, digits))


def _other_digit(rng: random.Random, right: int) -> int:
    return rng.choice([d for d in range(10) if d != right])


def student_answer(task: Task, rng: random.Random, slip: float = SLIP) -> list[int]:
    """An answer with the policy's mistakes, each step taken from the student's own last digit."""
    out = [task.start if rng.random() >= slip else _other_digit(rng, task.start)]
    while len(out) < task.n:
        right, misconception = task.step(out[-1]), task.misconceived(out[-1])
        if misconception is not None and rng.random() < misconception[1]:
            out.append(misconception[0])
        else:
            out.append(right if rng.random() >= slip else _other_digit(rng, right))
    return out


def worse_answer(task: Task, rng: random.Random) -> list[int]:
    return student_answer(task, rng, slip=WORSE_SLIP)


# ---- judging and labels -------------------------------------------------------------------------


def _expected(task: Task, items: list[str], position: int) -> str:
    """The right item at `position`, given the items before it in the same response."""
    if position == 0 or not items[position - 1].isdigit() or len(items[position - 1]) != 1:
        return str(task.solution[position]) if position < task.n else ""
    return str(task.step(int(items[position - 1])))


def char_labels(task: Task, response: str) -> tuple[list[int], int]:
    """A label per character of the response, and the label of the end-of-turn after it."""
    labels, items = [], response.split(",")
    for position, item in enumerate(items):
        if position:
            labels.append(NEUTRAL)  # the separating comma
        right = position < task.n and item == _expected(task, items, position)
        labels.extend([GOOD if right else BAD] * len(item))
    return labels, (BAD if len(items) < task.n else NEUTRAL)


def hard_chars(task: Task, response: str) -> list[bool]:
    """Per character of the response: whether it belongs to a step where the starting policy prefers a
    misconception (the hard steps, where log π_ref points the wrong way)."""
    flags, items = [], response.split(",")
    for position, item in enumerate(items):
        if position:
            flags.append(False)
        previous = items[position - 1] if position else ""
        crossing = len(previous) == 1 and previous.isdigit() and task.misconceived(int(previous)) is not None
        flags.extend([crossing and position < task.n] * len(item))
    return flags


def judge(task: Task, response: str) -> float:
    """A score for the whole response (sequence level only, like a reward model): the share of
    right steps, less the share of missing or extra ones."""
    items = response.split(",")
    right = sum(position < task.n and item == _expected(task, items, position) for position, item in enumerate(items))
    return (right - abs(len(items) - task.n)) / task.n


def is_solved(task: Task, response: str) -> bool:
    return response == answer_text(task.solution)


def token_labels(token_texts: list[str], chars: list[int], end_label: int) -> np.ndarray:
    """Labels per token from labels per character: bad if a token covers a bad character, else
    good if it covers a good one, else neutral. Text past the response (the end-of-turn) takes
    `end_label`."""
    labels, start = [], 0
    for text in token_texts:
        covered = chars[start:start + len(text)]
        if start >= len(chars):
            labels.append(end_label)
        elif BAD in covered:
            labels.append(BAD)
        else:
            labels.append(GOOD if GOOD in covered else NEUTRAL)
        start += len(text)
    return np.asarray(labels, dtype=np.int8)


def token_flags(token_texts: list[str], chars: list[bool]) -> np.ndarray:
    """Per token: whether it covers a flagged character."""
    flags, start = [], 0
    for text in token_texts:
        flags.append(any(chars[start:start + len(text)]))
        start += len(text)
    return np.asarray(flags, dtype=bool)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a good token scores above a bad one (ties count one half); neutral
    tokens are left out. The Mann-Whitney U statistic over average ranks."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    keep = labels != NEUTRAL
    scores, good = scores[keep], labels[keep] == GOOD
    n_good, n_bad = int(good.sum()), int((~good).sum())
    if not n_good or not n_bad:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties share their mean rank
    rank_sum = average_rank[inverse][good].sum()
    return float((rank_sum - n_good * (n_good + 1) / 2) / (n_good * n_bad))
