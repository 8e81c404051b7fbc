"""Small local files in the schema of the three workflows' hub datasets, written by the tests:

xiyuez/red-dot-design-award-product-description   product, category, description, text   (CSV)
yahma/alpaca-cleaned                               instruction, input, output              (JSON lines)
HuggingFaceH4/no_robots                            prompt, prompt_id, messages, category   (train/test)
HuggingFaceH4/ultrafeedback_binarized              prompt, prompt_id, chosen, rejected, messages, score_chosen,
                                                   score_rejected                          (train_prefs/test_prefs)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

WORDS = [
    "compact",
    "light",
    "modular",
    "quiet",
    "steel",
    "oak",
    "glass",
    "soft",
    "bright",
    "durable",
    "smart",
    "foldable",
    "warm",
    "clean",
    "simple",
    "portable",
    "elegant",
    "sturdy",
    "precise",
    "calm",
]
PRODUCTS = [
    "lamp",
    "chair",
    "kettle",
    "speaker",
    "bicycle",
    "watch",
    "desk",
    "stool",
    "headphones",
    "backpack",
    "vase",
    "clock",
]
CATEGORIES = ["Lighting", "Furniture", "Kitchen", "Audio", "Mobility", "Accessories"]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def product_descriptions(path: Path, rows: int = 64) -> Path:
    rng = random.Random(0)
    records = []
    for i in range(rows):
        product = f"{rng.choice(WORDS).capitalize()} {rng.choice(PRODUCTS)} {i}"
        category = rng.choice(CATEGORIES)
        description = " ".join(_sentence(rng, rng.randint(6, 12)) for _ in range(2))
        records.append(
            {
                "product": product,
                "category": category,
                "description": description,
                "text": f"Product Name: {product}\n\nProduct Category: {category}\n\n"
                f"Product Description: {description}",
            }
        )
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def alpaca_cleaned(path: Path, rows: int = 96) -> Path:
    rng = random.Random(1)
    with path.open("w") as f:
        for i in range(rows):
            word = rng.choice(PRODUCTS)
            row = {
                "instruction": f"Describe a {rng.choice(WORDS)} {word} in one sentence.",
                "input": "" if i % 3 else f"The {word} is {rng.choice(WORDS)}.",
                "output": _sentence(rng, rng.randint(5, 10)),
            }
            f.write(json.dumps(row) + "\n")
    return path


def no_robots(folder: Path, train: int = 48, test: int = 8) -> Path:
    rng = random.Random(2)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                prompt = f"Write a note about a {rng.choice(WORDS)} {rng.choice(PRODUCTS)}."
                messages = [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": _sentence(rng, rng.randint(6, 14))},
                ]
                if i % 4 == 0:
                    messages = [
                        {"role": "system", "content": "You are concise."},
                        *messages,
                        {"role": "user", "content": "Shorter?"},
                        {"role": "assistant", "content": _sentence(rng, 4)},
                    ]
                f.write(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "prompt_id": f"{split}-{i}",
                            "messages": messages,
                            "category": rng.choice(["Generation", "Brainstorm", "Chat"]),
                        }
                    )
                    + "\n"
                )
    return folder


def ultrafeedback_binarized(folder: Path, train: int = 48, test: int = 8) -> Path:
    """Preference pairs as HuggingFaceH4/ultrafeedback_binarized lays them out: a text prompt, chosen and rejected
    as whole conversations (the prompt turn, then the response), messages (= chosen) and the two scores."""
    rng = random.Random(3)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train_prefs", train), ("test_prefs", test)):
        # the hub's file layout, from which datasets takes split names other than train/test
        with (folder / "data" / f"{split}-00000-of-00001.jsonl").open("w") as f:
            for i in range(n):
                prompt = f"Describe a {rng.choice(WORDS)} {rng.choice(PRODUCTS)} in one sentence."
                user = {"role": "user", "content": prompt}
                good = {"role": "assistant", "content": _sentence(rng, rng.randint(6, 12))}
                bad = {"role": "assistant", "content": _sentence(rng, rng.randint(2, 16))}
                row = {
                    "prompt": prompt,
                    "prompt_id": f"{split}-{i}",
                    "chosen": [user, good],
                    "rejected": [user, bad],
                    "messages": [user, good],
                    "score_chosen": 8.0,
                    "score_rejected": 3.0,
                }
                f.write(json.dumps(row) + "\n")
    return folder
