"""Write the JSON-extraction task: a sentence about a person -> {"name", "age", "city"} as one line of JSON.

Three splits of distinct people (train 400, val 40, test 60), one chat conversation per JSONL line:

    user       Extract the person as JSON with the keys name, age and city.
               <a sentence in one of eight phrasings>
    assistant  {"name": "Ana", "age": 34, "city": "Lisbon"}

Deterministic (seed 0): `python examples/json_extraction/make_data.py` rewrites the committed files unchanged.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Mateo", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara",
         "Zoltan", "Amara", "Bruno", "Carmen", "Dario", "Emeka"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Seoul", "Porto", "Dublin", "Quito", "Hanoi", "Krakow", "Austin",
          "Perth", "Accra", "Bergen", "Cusco", "Malmo", "Tunis", "Leeds", "Kyoto", "Recife"]
PHRASES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "At {age}, {name} moved to {city}.",
    "{name} ({age}) works in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "Our new colleague {name} is {age} and comes from {city}.",
    "{city} is home to {name}, who is {age}.",
    "Last week {name}, aged {age}, visited {city} and stayed.",
]
INSTRUCTION = "Extract the person as JSON with the keys name, age and city."


def conversation(name: str, age: int, city: str, phrase: str) -> dict:
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{phrase.format(name=name, age=age, city=city)}"},
                         {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(0)
    people = [(n, a, c) for n, c in itertools.product(NAMES, CITIES) for a in (rng.randint(18, 90),)]
    rng.shuffle(people)
    here = Path(__file__).parent
    for split, rows in (("train", people[:400]), ("val", people[400:440]), ("test", people[440:500])):
        lines = [json.dumps(conversation(*p, rng.choice(PHRASES))) for p in rows]
        (here / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
