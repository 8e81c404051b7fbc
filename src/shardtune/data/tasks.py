"""The built-in instruction task: short letter strings to sort (either way) or reverse.

Small enough to learn in a couple of minutes on two CPU cores by LoRA on a random tiny Llama, and exact
enough to check: a generation is right or wrong. Letters are space-separated so that the built-in
tokenizer gives one token per letter; they sit in the instruction (the `input` column stays empty), which
selects Alpaca's shorter prompt and keeps rows at about 45 tokens.
"""

from __future__ import annotations

import random

from shardtune.config import GeneratedTaskConfig

INSTRUCTIONS = {
    "sort": ("Sort the letters:", sorted),
    "sort_desc": ("Sort the letters from z to a:", lambda letters: sorted(letters, reverse=True)),
    "reverse": ("Reverse the letters:", lambda letters: letters[::-1]),
}


def generate_rows(cfg: GeneratedTaskConfig, seed: int) -> list[dict[str, str]]:
    """Alpaca rows (instruction, input, output), the same for the same settings and seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(cfg.rows):
        task = rng.choice(cfg.tasks)
        instruction, solve = INSTRUCTIONS[task]
        letters = [rng.choice(cfg.letters) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
        rows.append(
            {
                "instruction": f"{instruction} {' '.join(letters)}",
                "input": "",
                "output": " ".join(solve(letters)),
            }
        )
    return rows
