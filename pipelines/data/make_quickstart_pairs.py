"""Write quickstart-pairs.jsonl: a small preference dataset made for treg's quickstart.

Every prompt is a small instruction with a checkable answer; `chosen` answers it correctly and
politely, `rejected` gets one thing wrong (a number, the letter case, the order, the count) or
refuses. Some prompts carry a system message or an earlier turn, so the data has both formats.
Run again to regenerate the same file: python pipelines/data/make_quickstart_pairs.py
"""

import json
import random
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pencil", "garden", "violin",
         "copper", "lemon", "forest", "window", "rocket", "candle", "silver", "island", "meadow", "harbor"]


def arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, result = rng.choice([("plus", a + b), ("minus", a - b), ("times", a * b)])
    wrong = result + rng.choice([-3, -2, -1, 1, 2, 10])
    return (f"What is {a} {op} {b}?", f"{a} {op} {b} is {result}.", f"{a} {op} {b} is {wrong}.")


def capitalize(rng):
    word = rng.choice(WORDS)
    return (f"Write the word \"{word}\" with only its first letter capitalized.",
            f"{word.capitalize()}", f"{word.upper()}")


def sort_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    right = sorted(words)
    wrong = right[:]
    i = rng.randrange(len(wrong) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    return (f"Sort these words alphabetically: {', '.join(words)}.",
            f"In alphabetical order: {', '.join(right)}.", f"In alphabetical order: {', '.join(wrong)}.")


def count_letters(rng):
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    return (f"How many times does the letter '{letter}' appear in \"{word}\"?",
            f"The letter '{letter}' appears {n} time{'s' if n != 1 else ''} in \"{word}\".",
            f"The letter '{letter}' appears {n + 1} times in \"{word}\".")


def copy_text(rng):
    phrase = " ".join(rng.sample(WORDS, 4))
    dropped = " ".join(phrase.split()[:3])
    return (f"Repeat exactly: {phrase}", phrase, dropped)


def refusal(rng):
    prompt, good, _ = rng.choice([arithmetic, capitalize, sort_words, count_letters])(rng)
    return prompt, good, "I can't help with that."


TASKS = [arithmetic, capitalize, sort_words, count_letters, copy_text, refusal]


def main(n: int = 320, seed: int = 2024) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, chosen, rejected = rng.choice(TASKS)(rng)
        row = {"id": f"qs-{i:04d}"}
        style = i % 4
        if style == 0:  # plain strings
            row.update(prompt=prompt, chosen=chosen, rejected=rejected)
        elif style == 1:  # conversational with a system message
            row.update(prompt=[{"role": "system", "content": "You are a careful assistant."},
                               {"role": "user", "content": prompt}],
                       chosen=[{"role": "assistant", "content": chosen}],
                       rejected=[{"role": "assistant", "content": rejected}])
        else:  # conversational, prompt implicit in the history (one or two turns)
            history = [{"role": "user", "content": prompt}]
            if style == 3:
                history = [{"role": "user", "content": "Hello!"},
                           {"role": "assistant", "content": "Hello! What can I do for you?"}] + history
            row.update(chosen=history + [{"role": "assistant", "content": chosen}],
                       rejected=history + [{"role": "assistant", "content": rejected}])
        rows.append(row)
    path = Path(__file__).with_name("quickstart-pairs.jsonl")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
