"""A built-in instruction dataset that needs no download: Alpaca records generated from a seed.

Nine task families with free-text answers (word problems, list reversal and sorting, capitals, string edits,
unit conversions, antonyms, number sequences, animal facts, short descriptions). Each answer is a sentence built
from the question's content, so a model that only learns the answer templates scores visibly lower on ROUGE-L
than one that learns the content, and a tiny OPT learns most of it in minutes on a CPU.

Specs: `builtin` / `builtin:train` (3,000 records) and `builtin:test` (300 records). Test prompts avoid the training
prompts wherever a family has room for new ones; the lookup families (capitals, antonyms, animals) have few
distinct questions, so there the test split asks about facts the training split taught.

Prepared folders and the `builtin-tiny` tokenizer cache are keyed by the generated records themselves, so a
change here invalidates them; bump BUILTIN_VERSION as well to say so in manifests.
"""
from __future__ import annotations

import random
from typing import Callable

BUILTIN_VERSION = 1
SPLITS = {"train": (3000, 1234), "test": (300, 98765)}

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin", "Hungary": "Budapest", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Ghana": "Accra", "Peru": "Lima", "Chile": "Santiago", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Cuba": "Havana", "Argentina": "Buenos Aires", "Colombia": "Bogota",
    "Australia": "Canberra", "Turkey": "Ankara", "Iran": "Tehran", "Russia": "Moscow", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Morocco": "Rabat", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Indonesia": "Jakarta", "Philippines": "Manila", "Iceland": "Reykjavik",
}
_ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "strong": "weak", "high": "low", "rich": "poor", "hard": "soft",
    "young": "old", "loud": "quiet", "wet": "dry", "near": "far", "thick": "thin", "clean": "dirty",
    "cheap": "expensive", "long": "short", "heavy": "light", "wide": "narrow", "true": "false",
}
# animal -> (class, habitat, food)
_ANIMALS = {
    "dolphin": ("mammal", "ocean", "fish"), "eagle": ("bird", "mountains", "small animals"),
    "salmon": ("fish", "river", "insects"), "frog": ("amphibian", "pond", "insects"),
    "lion": ("mammal", "savanna", "meat"), "penguin": ("bird", "ice", "fish"),
    "shark": ("fish", "ocean", "fish"), "rabbit": ("mammal", "meadow", "grass"),
    "owl": ("bird", "forest", "mice"), "turtle": ("reptile", "beach", "plants"),
    "camel": ("mammal", "desert", "plants"), "snake": ("reptile", "grassland", "mice"),
    "bee": ("insect", "garden", "nectar"), "horse": ("mammal", "farm", "hay"),
    "parrot": ("bird", "jungle", "seeds"), "crab": ("crustacean", "beach", "algae"),
}
_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Leo",
          "Maya", "Nils", "Olga", "Paul", "Rosa", "Sam", "Tara", "Omar"]
_ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cookies", "shells", "cards", "plums"]
_WORDS = ["river", "garden", "window", "planet", "silver", "candle", "forest", "pepper", "rocket", "island",
          "butter", "guitar", "basket", "tunnel", "winter", "castle", "marble", "orange", "ladder", "cotton",
          "falcon", "meadow", "harbor", "lemon", "violet", "thunder", "bridge", "copper", "pillow", "desert"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "white", "black", "orange", "grey", "brown"]
_PLACES = ["city", "village", "forest", "harbor", "valley", "desert", "island", "mountain town"]
_OBJECTS = ["house", "boat", "car", "bicycle", "lamp", "chair", "kite", "tent"]
_SIZES = ["tiny", "small", "large", "huge", "narrow", "tall"]
# (from, to, factor)
_UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
          ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("days", "hours", 24),
          ("weeks", "days", 7), ("liters", "milliliters", 1000), ("years", "months", 12)]

Record = dict[str, str]


def _arithmetic(r: random.Random) -> Record:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(2, 40), r.randint(2, 30)
    kind = r.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        ans = f"{name} has {a} + {b} = {a + b} {item} now."
    elif kind == 1:
        a, b = max(a, b), min(a, b)
        q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        ans = f"{name} has {a} - {b} = {a - b} {item} left."
    else:
        a, b = r.randint(2, 9), r.randint(2, 12)
        q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} is that in total?"
        ans = f"That is {a} x {b} = {a * b} {item} in total."
    return {"instruction": r.choice(["Solve the word problem.", "Answer the math question.",
                                     "Work out the answer to this problem."]), "input": q, "output": ans}


def _lists(r: random.Random) -> Record:
    kind = r.randrange(3)
    if kind == 0:
        words = r.sample(_WORDS + _COLORS, r.randint(3, 6))
        return {"instruction": r.choice(["Reverse the order of the words in the list.",
                                         "Write the list backwards."]),
                "input": ", ".join(words), "output": "The reversed list is: " + ", ".join(reversed(words)) + "."}
    if kind == 1:
        nums = [r.randint(1, 99) for _ in range(r.randint(3, 7))]
        return {"instruction": r.choice(["Sort the numbers from smallest to largest.",
                                         "Put these numbers in ascending order."]),
                "input": ", ".join(map(str, nums)),
                "output": "In ascending order: " + ", ".join(map(str, sorted(nums))) + "."}
    words = r.sample(_WORDS, r.randint(3, 6))
    return {"instruction": r.choice(["Sort the words alphabetically.", "Put the words in alphabetical order."]),
            "input": " ".join(words), "output": "Alphabetically: " + ", ".join(sorted(words)) + "."}


def _capitals(r: random.Random) -> Record:
    country = r.choice(sorted(_CAPITALS))
    city = _CAPITALS[country]
    if r.random() < 0.6:
        q = r.choice([f"What is the capital of {country}?", f"Name the capital city of {country}.",
                      f"Which city is the capital of {country}?"])
        return {"instruction": q, "input": "", "output": f"The capital of {country} is {city}."}
    return {"instruction": f"{city} is the capital of which country?", "input": "",
            "output": f"{city} is the capital of {country}."}


def _strings(r: random.Random) -> Record:
    word = r.choice(_WORDS)
    kind = r.randrange(4)
    if kind == 0:
        return {"instruction": "Spell the word backwards.", "input": word,
                "output": f"{word} spelled backwards is {word[::-1]}."}
    if kind == 1:
        return {"instruction": "Write the word in capital letters.", "input": word,
                "output": f"In capital letters: {word.upper()}."}
    if kind == 2:
        return {"instruction": f"How many letters are in the word '{word}'?", "input": "",
                "output": f"The word {word} has {len(word)} letters."}
    letter = r.choice(sorted(set(word)))
    n = word.count(letter)
    return {"instruction": f"How many times does the letter '{letter}' appear in '{word}'?", "input": "",
            "output": f"The letter {letter} appears {n} time{'s' if n != 1 else ''} in {word}."}


def _units(r: random.Random) -> Record:
    src, dst, factor = r.choice(_UNITS)
    x = r.randint(2, 25)
    return {"instruction": r.choice([f"Convert {x} {src} to {dst}.", f"How many {dst} are in {x} {src}?"]),
            "input": "", "output": f"{x} {src} is {x * factor} {dst}, because one {src[:-1]} is {factor} {dst}."}


def _antonyms(r: random.Random) -> Record:
    word, opp = r.choice(sorted(_ANTONYMS.items()))
    if r.random() < 0.5:
        word, opp = opp, word
    return {"instruction": r.choice(["Give the opposite of the word.", "What is the antonym of this word?"]),
            "input": word, "output": f"The opposite of {word} is {opp}."}


def _sequences(r: random.Random) -> Record:
    start, step, n = r.randint(1, 20), r.randint(2, 9), r.randint(4, 6)
    seq = [start + i * step for i in range(n)]
    return {"instruction": "Continue the number sequence with the next number.",
            "input": ", ".join(map(str, seq)),
            "output": f"The numbers go up by {step}, so the next number is {seq[-1] + step}."}


def _animals(r: random.Random) -> Record:
    animal = r.choice(sorted(_ANIMALS))
    cls, home, food = _ANIMALS[animal]
    if r.random() < 0.5:
        return {"instruction": f"What kind of animal is a {animal}?", "input": "",
                "output": f"A {animal} is a {cls}. It lives near the {home} and eats {food}."}
    return {"instruction": "Tell me where this animal lives and what it eats.", "input": animal,
            "output": f"The {animal} lives near the {home} and mostly eats {food}."}


def _descriptions(r: random.Random) -> Record:
    size, color, obj, place = r.choice(_SIZES), r.choice(_COLORS), r.choice(_OBJECTS), r.choice(_PLACES)
    owner = r.choice(_NAMES)
    return {"instruction": "Write one or two sentences describing the scene.",
            "input": f"a {size} {color} {obj}, {owner}, {place}",
            "output": f"{owner} owns a {size} {color} {obj} in the {place}. "
                      f"Everyone in the {place} knows {owner}'s {color} {obj}."}


_FAMILIES: list[Callable[[random.Random], Record]] = [
    _arithmetic, _lists, _capitals, _strings, _units, _antonyms, _sequences, _animals, _descriptions,
]


def generate_records(n: int, seed: int, exclude: set[tuple[str, str]] | None = None) -> list[Record]:
    """`n` Alpaca records (instruction, input, output), the same for the same (n, seed, BUILTIN_VERSION).

    A record whose (instruction, input) is in `exclude` is redrawn, up to 50 times per record: families with a
    small prompt space (the lookups) then keep a seen prompt rather than loop forever.
    """
    r = random.Random(seed)
    out: list[Record] = []
    for i in range(n):
        family = _FAMILIES[i % len(_FAMILIES)]  # round robin keeps the families balanced
        for _ in range(50):
            rec = family(r)
            if not exclude or (rec["instruction"], rec["input"]) not in exclude:
                break
        out.append(rec)
    return out


def builtin_split(name: str = "train") -> list[Record]:
    """The named built-in split: 'train' or 'test'."""
    if name not in SPLITS:
        raise ValueError(f"unknown built-in split {name!r}; choose one of {', '.join(SPLITS)}")
    n, seed = SPLITS[name]
    exclude = None
    if name != "train":
        n_train, seed_train = SPLITS["train"]
        exclude = {(x["instruction"], x["input"]) for x in generate_records(n_train, seed_train)}
    return generate_records(n, seed, exclude)


def parse_builtin_spec(spec: str) -> str | None:
    """'builtin' / 'builtin:NAME' -> split name; anything else -> None."""
    if spec == "builtin":
        return "train"
    if spec.startswith("builtin:"):
        return spec.split(":", 1)[1]
    return None
