"""The built-in instruction task: short letter strings to sort (either way) or reverse; and its preference
form, for DPO and ORPO: the same Alpaca prompt, the right answer chosen, a near miss (two different letters of
it swapped) rejected.

Small enough to learn in a couple of minutes on two CPU cores by LoRA on a random tiny Llama, and exact
enough to check: a generation is right or wrong. Letters are space-separated so that the built-in
tokenizer gives one token per letter; they sit in the instruction (the `input` column stays empty), which
selects Alpaca's shorter prompt and keeps rows at about 45 tokens.
"""

from __future__ import annotations

import random

from shardtune.config import GeneratedTaskConfig
from shardtune.data.formats import ALPACA_PROMPT_NO_INPUT

INSTRUCTIONS = {
    "sort": ("Sort the letters:", sorted),
    "sort_desc": ("Sort the letters from z to a:", lambda letters: sorted(letters, reverse=True)),
    "reverse": ("Reverse the letters:", lambda letters: letters[::-1]),
}


def generate_rows(cfg: GeneratedTaskConfig, seed: int, pairs: bool = False) -> list[dict[str, str]]:
    """Alpaca rows (instruction, input, output), the same for the same settings and seed; with `pairs`,
    preference rows (prompt: the Alpaca prompt of the instruction, chosen: the answer, rejected: a near miss)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(cfg.rows):
        task = rng.choice(cfg.tasks)
        instruction, solve = INSTRUCTIONS[task]
        letters = [rng.choice(cfg.letters) for _ in range(rng.randint(cfg.min_len, cfg.max_len))]
        if pairs and len(set(letters)) == 1:  # nothing to swap: one letter changed
            letters[-1] = next(c for c in cfg.letters if c != letters[0])
        answer = solve(letters)
        question = f"{instruction} {' '.join(letters)}"
        if not pairs:
            rows.append({"instruction": question, "input": "", "output": " ".join(answer)})
            continue
        rows.append(
            {
                "prompt": ALPACA_PROMPT_NO_INPUT.format(instruction=question),
                "chosen": " ".join(answer),
                "rejected": " ".join(near_miss(answer, rng)),
            }
        )
    return rows


def near_miss(answer: list[str], rng: random.Random) -> list[str]:
    """The answer with two different letters swapped (adjacent ones where they differ)."""
    spots = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    i = rng.choice(spots)
    swapped = list(answer)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    return swapped
