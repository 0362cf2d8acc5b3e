"""Write the labelled minimal-edit pairs for treg-probe: the rejected answer is the chosen one with one span edited
to make it wrong.

Two files come out of one pool of items, split so that no question is in both:
- treg_data/probe_pairs.jsonl, the shipped set: 40 pairs of each kind (fact, arithmetic, format, reasoning);
- pipelines/data/probe-dev-pairs.jsonl, a disjoint development set: 12 pairs of each kind, for choosing prompt
  wording without looking at the shipped set.

Every edit sits after the first character and both answers end with the same text, so the edited tokens are a
span in the middle or near the end (treg_data.edits finds them by common prefix and suffix). The content is
hand-written here; nothing is downloaded. Run again to regenerate the same files:
.venv/bin/python pipelines/data/make_probe_pairs.py
"""

import json
import random
import re
from fractions import Fraction
from pathlib import Path

from treg_data.edits import common_ends

SEED = 20250101
N_SHIPPED, N_DEV = 40, 12
KINDS = ("fact", "arithmetic", "format", "reasoning")
HERE = Path(__file__).resolve().parent
SHIPPED_PATH = HERE.parents[1] / "treg_data" / "probe_pairs.jsonl"
DEV_PATH = HERE / "probe-dev-pairs.jsonl"


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---- fact: (subject, right, wrong); the wrong entity is of the same type and false for the question ---------------

FACT_TOPICS = {
    "capital": ("What is the capital of {s}?", "The capital of {s} is {x}.", [
        ("France", "Paris", "Lyon"), ("Australia", "Canberra", "Sydney"), ("Canada", "Ottawa", "Toronto"),
        ("Turkey", "Ankara", "Istanbul"), ("Switzerland", "Bern", "Zurich"), ("Japan", "Tokyo", "Osaka"),
        ("Spain", "Madrid", "Barcelona"), ("Italy", "Rome", "Milan"), ("Germany", "Berlin", "Munich"),
        ("Egypt", "Cairo", "Alexandria"), ("Kenya", "Nairobi", "Mombasa"), ("New Zealand", "Wellington", "Auckland"),
        ("Nigeria", "Abuja", "Lagos"), ("Morocco", "Rabat", "Casablanca"), ("Vietnam", "Hanoi", "Ho Chi Minh City"),
        ("Norway", "Oslo", "Bergen"), ("Portugal", "Lisbon", "Porto"), ("China", "Beijing", "Shanghai"),
        ("South Korea", "Seoul", "Busan"), ("Peru", "Lima", "Cusco"),
    ]),
    "element": ("What is the chemical symbol for {s}?", "The chemical symbol for {s} is {x}.", [
        ("gold", "Au", "Ag"), ("silver", "Ag", "Au"), ("iron", "Fe", "Ir"), ("sodium", "Na", "S"),
        ("potassium", "K", "P"), ("lead", "Pb", "Sn"), ("tin", "Sn", "Ti"), ("copper", "Cu", "Co"),
        ("mercury", "Hg", "Mn"), ("oxygen", "O", "Os"), ("helium", "He", "Ne"), ("carbon", "C", "Ca"),
        ("calcium", "Ca", "Cd"), ("nitrogen", "N", "Ni"), ("zinc", "Zn", "Zr"), ("chlorine", "Cl", "Cr"),
    ]),
    "author": ("Who wrote {s}?", "{s} was written by {x}.", [
        ("Pride and Prejudice", "Jane Austen", "Charlotte Bronte"),
        ("Jane Eyre", "Charlotte Bronte", "Jane Austen"),
        ("Wuthering Heights", "Emily Bronte", "Mary Shelley"),
        ("Hamlet", "William Shakespeare", "Christopher Marlowe"),
        ("Moby-Dick", "Herman Melville", "Mark Twain"),
        ("Nineteen Eighty-Four", "George Orwell", "Aldous Huxley"),
        ("Brave New World", "Aldous Huxley", "George Orwell"),
        ("War and Peace", "Leo Tolstoy", "Fyodor Dostoevsky"),
        ("Crime and Punishment", "Fyodor Dostoevsky", "Leo Tolstoy"),
        ("The Adventures of Tom Sawyer", "Mark Twain", "Charles Dickens"),
        ("Oliver Twist", "Charles Dickens", "Thomas Hardy"),
        ("Frankenstein", "Mary Shelley", "Bram Stoker"),
        ("Dracula", "Bram Stoker", "Mary Shelley"),
        ("The Great Gatsby", "F. Scott Fitzgerald", "Ernest Hemingway"),
        ("The Old Man and the Sea", "Ernest Hemingway", "John Steinbeck"),
        ("Mrs Dalloway", "Virginia Woolf", "Jane Austen"),
    ]),
    "language": ("What is the main language spoken in {s}?", "The main language spoken in {s} is {x}.", [
        ("Brazil", "Portuguese", "Spanish"), ("Mexico", "Spanish", "Portuguese"), ("Japan", "Japanese", "Korean"),
        ("Germany", "German", "Dutch"), ("Italy", "Italian", "French"), ("Egypt", "Arabic", "Turkish"),
        ("Iran", "Persian", "Arabic"), ("the Netherlands", "Dutch", "German"), ("Greece", "Greek", "Turkish"),
        ("Poland", "Polish", "Russian"), ("Sweden", "Swedish", "Norwegian"), ("Portugal", "Portuguese", "Spanish"),
        ("Argentina", "Spanish", "Portuguese"), ("Turkey", "Turkish", "Greek"),
    ]),
    "superlative": ("What is {s}?", "{S} is {x}.", [
        ("the largest planet in the Solar System", "Jupiter", "Saturn"),
        ("the planet closest to the Sun", "Mercury", "Venus"),
        ("the hottest planet in the Solar System", "Venus", "Mercury"),
        ("the largest ocean on Earth", "the Pacific Ocean", "the Atlantic Ocean"),
        ("the tallest mountain above sea level", "Mount Everest", "K2"),
        ("the largest continent by area", "Asia", "Africa"),
        ("the largest country by area", "Russia", "Canada"),
        ("the fastest land animal", "the cheetah", "the lion"),
        ("the tallest living animal", "the giraffe", "the elephant"),
        ("the lightest chemical element", "hydrogen", "helium"),
        ("the hardest natural mineral", "diamond", "quartz"),
        ("the longest bone in the human body", "the femur", "the tibia"),
        ("the largest organ of the human body", "the skin", "the liver"),
    ]),
    "young": ("What is a baby {s} called?", "A baby {s} is called {x}.", [
        ("cat", "a kitten", "a puppy"), ("dog", "a puppy", "a kitten"), ("cow", "a calf", "a foal"),
        ("horse", "a foal", "a calf"), ("sheep", "a lamb", "a kid"), ("goat", "a kid", "a lamb"),
        ("frog", "a tadpole", "a caterpillar"), ("kangaroo", "a joey", "a cub"), ("bear", "a cub", "a fawn"),
        ("deer", "a fawn", "a foal"), ("swan", "a cygnet", "a gosling"), ("goose", "a gosling", "a cygnet"),
        ("pig", "a piglet", "a lamb"), ("duck", "a duckling", "a gosling"),
    ]),
    "unit": ("What is the SI unit of {s}?", "The SI unit of {s} is the {x}.", [
        ("force", "newton", "joule"), ("energy", "joule", "watt"), ("power", "watt", "joule"),
        ("pressure", "pascal", "newton"), ("frequency", "hertz", "watt"), ("electric current", "ampere", "volt"),
        ("electrical resistance", "ohm", "ampere"), ("electric charge", "coulomb", "ampere"),
        ("mass", "kilogram", "newton"), ("length", "metre", "foot"), ("amount of substance", "mole", "kilogram"),
        ("luminous intensity", "candela", "lumen"), ("electric potential difference", "volt", "ampere"),
    ]),
    "colour": ("What colour do you get by mixing {s} paint?", "Mixing {s} paint gives {x}.", [
        ("blue and yellow", "green", "purple"), ("red and yellow", "orange", "green"),
        ("red and blue", "purple", "orange"), ("red and white", "pink", "purple"),
        ("black and white", "grey", "brown"),
    ]),
    "currency": ("What is the currency of {s}?", "The currency of {s} is the {x}.", [
        ("Japan", "yen", "won"), ("South Korea", "won", "yen"), ("the United Kingdom", "pound sterling", "euro"),
        ("India", "rupee", "baht"), ("Switzerland", "Swiss franc", "euro"), ("Russia", "rouble", "zloty"),
        ("Mexico", "peso", "real"), ("Brazil", "real", "peso"), ("Thailand", "baht", "rupee"),
        ("Poland", "zloty", "rouble"),
    ]),
}


def fact_item(prompt: str, answer: str, s: str, right: str, wrong: str) -> tuple[str, str, str]:
    return prompt.format(s=s), answer.format(s=s, S=cap(s), x=right), answer.format(s=s, S=cap(s), x=wrong)


def fact_groups() -> list[list[tuple[str, str, str]]]:
    return [[fact_item(prompt, answer, *r) for r in rows] for prompt, answer, rows in FACT_TOPICS.values()]


# ---- arithmetic: small operands, a result off by 1-3 or with one wrong digit --------------------------------------

def wrong_result(result: int, rng: random.Random) -> int:
    if result >= 10 and rng.random() < 0.3:  # one wrong digit; a leading zero would read as a format slip, not a sum
        digits = str(result)
        i = rng.randrange(len(digits))
        options = [d for d in "0123456789" if d != digits[i] and (i or d != "0")]
        return int(digits[:i] + rng.choice(options) + digits[i + 1:])
    return result + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if result + d >= 0])


def add(rng: random.Random) -> tuple[int, str, int, int]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return a, "+", b, a + b


def subtract(rng: random.Random) -> tuple[int, str, int, int]:
    a = rng.randint(2, 99)
    b = rng.randint(1, a - 1)  # a positive result: the wrong one must never be negative either
    return a, "-", b, a - b


def multiply(rng: random.Random) -> tuple[int, str, int, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 19)
    return a, "×", b, a * b


def arithmetic_group(op, rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    seen, rows = set(), []
    while len(rows) < n:
        a, sign, b, result = op(rng)
        key = (sign, a, b) if sign == "-" else (sign, min(a, b), max(a, b))  # 7 + 5 and 5 + 7 are one item
        if key in seen:
            continue
        seen.add(key)
        wrong = wrong_result(result, rng)
        rows.append((f"What is {a} {sign} {b}?", f"{a} {sign} {b} = {result}.", f"{a} {sign} {b} = {wrong}."))
    return rows


def arithmetic_groups(rng: random.Random) -> list[list[tuple[str, str, str]]]:
    return [arithmetic_group(op, rng, 24) for op in (add, subtract, multiply)]


# ---- format: the chosen answer follows an explicit instruction, the rejected breaks it in one span -----------------

CAPITALS = [  # (question, answer): the answer word goes in capital letters
    ("What colour is a ripe banana?", "yellow"), ("What colour is fresh snow?", "white"),
    ("What colour is coal?", "black"), ("What colour is fresh grass?", "green"),
    ("What colour is a clear daytime sky?", "blue"), ("What colour is a ripe strawberry?", "red"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What do bees make from nectar?", "honey"),
    ("What is frozen water called?", "ice"), ("Which gas do humans need to breathe to stay alive?", "oxygen"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBERS = [  # (question, lead, digits, words, tail)
    ("How many legs does a spider have?", "A spider has", "8", "eight", "legs."),
    ("How many days are in a leap year?", "A leap year has", "366", "three hundred and sixty-six", "days."),
    ("How many hours are in a day?", "A day has", "24", "twenty-four", "hours."),
    ("How many minutes are in an hour?", "An hour has", "60", "sixty", "minutes."),
    ("How many cards are in a standard deck without jokers?", "A standard deck has", "52", "fifty-two", "cards."),
    ("How many squares are on a chessboard?", "A chessboard has", "64", "sixty-four", "squares."),
    ("How many years are in a century?", "A century has", "100", "one hundred", "years."),
    ("How many keys does a standard piano have?", "A standard piano has", "88", "eighty-eight", "keys."),
    ("How many players does a football team have on the pitch?", "A football team has", "11", "eleven",
     "players on the pitch."),
    ("How many strings does a violin have?", "A violin has", "4", "four", "strings."),
    ("How many sides does a triangle have?", "A triangle has", "3", "three", "sides."),
    ("How many days are in a week?", "A week has", "7", "seven", "days."),
    ("How many months are in a year?", "A year has", "12", "twelve", "months."),
    ("How many legs does an insect have?", "An insect has", "6", "six", "legs."),
    ("How many sides does a hexagon have?", "A hexagon has", "6", "six", "sides."),
    ("How many arms does an octopus have?", "An octopus has", "8", "eight", "arms."),
    ("How many years are in a decade?", "A decade has", "10", "ten", "years."),
    ("How many continents are there on Earth?", "Earth has", "7", "seven", "continents."),
    ("How many sides does a pentagon have?", "A pentagon has", "5", "five", "sides."),
    ("How many faces does a cube have?", "A cube has", "6", "six", "faces."),
]
DIVISIONS = [(1, 2), (3, 2), (5, 2), (7, 2), (9, 2), (1, 5), (2, 5), (3, 5), (4, 5), (7, 5), (12, 5), (11, 2),
             (3, 10), (9, 10)]
OPPOSITES = [("hot", "cold"), ("full", "empty"), ("wet", "dry"), ("early", "late"), ("up", "down"), ("win", "lose"),
             ("day", "night"), ("true", "false"), ("north", "south"), ("left", "right"), ("before", "after"),
             ("above", "below"), ("push", "pull"), ("buy", "sell"), ("asleep", "awake")]
LISTS = [  # (question, lead, items)
    ("What are the three primary colours of light?", "The primary colours of light are", ["red", "green", "blue"]),
    ("What are the three common states of matter?", "The three common states of matter are",
     ["solid", "liquid", "gas"]),
    ("What are the four seasons?", "The four seasons are", ["spring", "summer", "autumn", "winter"]),
    ("What are the four cardinal directions?", "The four cardinal directions are",
     ["north", "east", "south", "west"]),
    ("What are the first three planets from the Sun?", "The first three planets from the Sun are",
     ["Mercury", "Venus", "Earth"]),
    ("What are the first four prime numbers?", "The first four prime numbers are", ["2", "3", "5", "7"]),
    ("What are the first three months of the year?", "The first three months of the year are",
     ["January", "February", "March"]),
    ("What are the last three months of the year?", "The last three months of the year are",
     ["October", "November", "December"]),
    ("What are the first four letters of the English alphabet?", "The first four letters of the English alphabet are",
     ["a", "b", "c", "d"]),
    ("What are the first four positive even numbers?", "The first four positive even numbers are",
     ["2", "4", "6", "8"]),
    ("What are the first three square numbers?", "The first three square numbers are", ["1", "4", "9"]),
    ("What are the two days of the weekend?", "The two days of the weekend are", ["Saturday", "Sunday"]),
    ("What are the first three noble gases in the periodic table?", "The first three noble gases are",
     ["helium", "neon", "argon"]),
    ("What are the three primary colours of traditional paint?", "The traditional primary colours of paint are",
     ["red", "yellow", "blue"]),
]


def capitals_items() -> list[tuple[str, str, str]]:
    return [(f"{q} Write the answer word in capital letters.", f"The answer is {a.upper()}.", f"The answer is {a}.")
            for q, a in CAPITALS]


def lowercase_items() -> list[tuple[str, str, str]]:
    rows = []
    for names, unit in ((DAYS, "day"), (MONTHS, "month")):
        for name, after in zip(names, names[1:]):
            rows.append((f"Which {unit} comes after {name}? Write the name of the {unit} in lowercase letters.",
                         f"The {unit} after {name} is {after.lower()}.", f"The {unit} after {name} is {after}."))
    return rows


def digits_items() -> list[tuple[str, str, str]]:
    return [(f"{q} Answer with the number written in digits.", f"{lead} {d} {tail}", f"{lead} {w} {tail}")
            for q, lead, d, w, tail in NUMBERS[:10]]


def words_items() -> list[tuple[str, str, str]]:
    return [(f"{q} Write the number in words, not digits.", f"{lead} {w} {tail}", f"{lead} {d} {tail}")
            for q, lead, d, w, tail in NUMBERS[10:]]


def decimals_items() -> list[tuple[str, str, str]]:
    rows = []
    for a, b in DIVISIONS:
        value = Fraction(a, b)
        assert value * 10 == int(value * 10), (a, b)  # one decimal place is exact
        # the rejected one adds a place rather than dropping one, so its own tokens carry the violation
        rows.append((f"What is {a} divided by {b}? Give the answer with exactly one decimal place.",
                     f"{a} divided by {b} is {float(value):.1f}.", f"{a} divided by {b} is {float(value):.2f}."))
    return rows


def quotes_items() -> list[tuple[str, str, str]]:
    return [(f"What is the opposite of '{w}'? Put the answer word in double quotes.",
             f'The opposite of {w} is "{o}".', f"The opposite of {w} is {o}.") for w, o in OPPOSITES]


def separator_items() -> list[tuple[str, str, str]]:
    rows = []
    for i, (q, lead, items) in enumerate(LISTS):
        asked, other = (("semicolons", "; "), ("commas", ", ")) if i % 2 else (("commas", ", "), ("semicolons", "; "))
        rows.append((f"{q} List them separated by {asked[0]}.", f"{lead} {asked[1].join(items)}.",
                     f"{lead} {other[1].join(items)}."))
    return rows


def format_groups() -> list[list[tuple[str, str, str]]]:
    return [capitals_items(), lowercase_items(), digits_items(), words_items(), decimals_items(), quotes_items(),
            separator_items()]


# ---- reasoning: a short chain; the rejected answer gets one step wrong and carries it to the end ------------------

NAMES = ["Tom", "Anna", "Ben", "Maya", "Leo", "Sara", "Omar", "Lily", "Jack", "Nina", "Sam", "Emma", "Ravi", "Zoe",
         "Hugo", "Ivy", "Kai", "Rosa", "Finn", "Mei"]
THINGS = ["apples", "marbles", "stickers", "pencils", "shells", "stamps", "cards", "cookies", "balloons", "buttons"]
ORDERS = [("taller", "shorter", "tallest", "shortest"), ("older", "younger", "oldest", "youngest"),
          ("faster", "slower", "fastest", "slowest"), ("heavier", "lighter", "heaviest", "lightest")]
SLIPS = (-2, -1, 1, 2)  # how far the wrong intermediate result is off


def buy_and_give(rng: random.Random) -> tuple[str, str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(3, 12), rng.randint(2, 9)
    c = rng.randint(1, a + b - 4)  # a slip of -2 still leaves at least 2, so the plural stays right

    def answer(s: int) -> str:
        return f"{name} has {a} + {b} = {s} {thing}, then {s} - {c} = {s - c}. {name} has {s - c} {thing} now."

    prompt = (f"{name} has {a} {thing} and buys {b} more. Then {name} gives away {c}. "
              f"How many {thing} does {name} have now?")
    return prompt, answer(a + b), answer(a + b + rng.choice(SLIPS))


def boxes(rng: random.Random) -> tuple[str, str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 6), rng.randint(3, 9)
    c = rng.randint(1, min(9, a * b - 4))  # as in buy_and_give: at least 2 left after any slip

    def answer(p: int) -> str:
        return f"There are {a} × {b} = {p} {thing}, then {p} - {c} = {p - c}. There are {p - c} {thing} left."

    prompt = (f"There are {a} boxes with {b} {thing} in each box. {name} takes {c} {thing} out. "
              f"How many {thing} are left in the boxes?")
    return prompt, answer(a * b), answer(a * b + rng.choice(SLIPS))


def savings(rng: random.Random) -> tuple[str, str, str]:
    name = rng.choice(NAMES)
    a, b, c = rng.randint(2, 9), rng.randint(2, 6), rng.randint(3, 15)

    def answer(p: int) -> str:
        return f"{name} saves {a} × {b} = {p} dollars, then {p} + {c} = {p + c}. {name} has {p + c} dollars now."

    prompt = (f"{name} saves {a} dollars each week for {b} weeks and then gets {c} dollars as a gift. "
              f"How many dollars does {name} have now?")
    return prompt, answer(a * b), answer(a * b + rng.choice(SLIPS))


def ages(rng: random.Random) -> tuple[str, str, str]:
    name = rng.choice(NAMES)
    a, b, c = rng.randint(5, 14), rng.randint(2, 9), rng.randint(2, 10)

    def answer(s: int) -> str:
        return (f"The brother is {a} + {b} = {s} years old now, then {s} + {c} = {s + c}. "
                f"In {c} years he will be {s + c} years old.")

    prompt = f"{name} is {a} years old. {name}'s brother is {b} years older. How old will the brother be in {c} years?"
    return prompt, answer(a + b), answer(a + b + rng.choice(SLIPS))


def sharing(rng: random.Random) -> tuple[str, str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    while True:  # a total that the friends can share evenly, at least 3 each so a slip of -k leaves 2
        a, b, k = rng.randint(2, 6), rng.randint(2, 8), rng.randint(2, 4)
        if a * b % k == 0 and a * b // k >= 3:
            break

    def answer(p: int) -> str:
        return f"{name} has {a} × {b} = {p} {thing}, then {p} ÷ {k} = {p // k}. Each friend gets {p // k} {thing}."

    prompt = (f"{name} has {a} bags with {b} {thing} in each bag and shares all the {thing} equally among {k} "
              f"friends. How many {thing} does each friend get?")
    slip = rng.choice((-k, k))  # off by k, so the wrong total still divides evenly
    return prompt, answer(a * b), answer(a * b + slip)


def ordering(rng: random.Random) -> tuple[str, str, str]:
    first, middle, last = rng.sample(NAMES, 3)
    more, less, most, least = rng.choice(ORDERS)
    top = rng.random() < 0.5  # ask for either end of the order
    right, word, superlative = (first, more, most) if top else (last, less, least)
    chain = f"{first} is {more} than {middle} and {middle} is {more} than {last}"

    def answer(who: str) -> str:
        return f"{chain}, so {who} is {word} than both. {who} is the {superlative}."

    prompt = f"{first} is {more} than {middle}, and {middle} is {more} than {last}. Who is the {superlative}?"
    return prompt, answer(right), answer(middle)  # the slip: taking the middle one for an end of the order


def unique_items(make, rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """n items of one template; a word problem is told apart by its numbers, so that two items never differ
    by a name or an object alone (they would be one question in both sets)."""
    seen, rows = set(), []
    while len(rows) < n:
        row = make(rng)
        key = tuple(re.findall(r"\d+", row[0])) or row[0]
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def reasoning_groups(rng: random.Random) -> list[list[tuple[str, str, str]]]:
    return [unique_items(make, rng, 15) for make in (buy_and_give, boxes, savings, ages, sharing, ordering)]


# ---- one pool per kind, split into the two sets ----------------------------------------------------------------


def interleave(groups: list[list[tuple[str, str, str]]], rng: random.Random) -> list[tuple[str, str, str]]:
    """Round-robin over the shuffled groups, so that both sets get a spread of topics and question types."""
    queues = [list(group) for group in groups]
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    pool = []
    while any(queues):
        pool += [queue.pop() for queue in queues if queue]
    return pool


def pools() -> dict[str, list[tuple[str, str, str]]]:
    rngs = {kind: random.Random(SEED + i) for i, kind in enumerate(KINDS)}  # one stream per kind: edits stay local
    groups = {"fact": fact_groups(), "arithmetic": arithmetic_groups(rngs["arithmetic"]),
              "format": format_groups(), "reasoning": reasoning_groups(rngs["reasoning"])}
    return {kind: interleave(groups[kind], rngs[kind]) for kind in KINDS}


def split(pool: dict[str, list[tuple[str, str, str]]]) -> tuple[list[dict], list[dict]]:
    """The first N_DEV items of each kind's pool go to the dev set, the next N_SHIPPED to the shipped one."""
    shipped, dev = [], []
    for kind in KINDS:
        items = pool[kind]
        assert len(items) >= N_DEV + N_SHIPPED, f"{kind}: only {len(items)} items"
        for i, (prompt, chosen, rejected) in enumerate(items[:N_DEV]):
            dev.append(row(f"dev-{kind}-{i:03d}", kind, prompt, chosen, rejected))
        for i, (prompt, chosen, rejected) in enumerate(items[N_DEV:N_DEV + N_SHIPPED]):
            shipped.append(row(f"{kind}-{i:03d}", kind, prompt, chosen, rejected))
    return shipped, dev


def row(id_: str, kind: str, prompt: str, chosen: str, rejected: str) -> dict:
    return {"id": id_, "kind": kind, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def check(shipped: list[dict], dev: list[dict]) -> None:
    """What treg-probe relies on: the rejected answer has an edited span, not at its start, before a shared ending
    (so the answers differ); and no question is in both sets."""
    rows = shipped + dev
    assert len({r["id"] for r in rows}) == len(rows), "duplicate id"
    assert len({r["prompt"] for r in rows}) == len(rows), "duplicate prompt"
    for r in rows:
        prefix, suffix = common_ends(r["chosen"], r["rejected"])
        assert 0 < prefix and 0 < suffix and prefix + suffix < len(r["rejected"]), r


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = {kind: sum(r["kind"] == kind for r in rows) for kind in KINDS}
    print(f"wrote {len(rows)} pairs to {path}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))


def main() -> None:
    shipped, dev = split(pools())
    check(shipped, dev)
    write(SHIPPED_PATH, shipped)
    write(DEV_PATH, dev)


if __name__ == "__main__":
    main()
