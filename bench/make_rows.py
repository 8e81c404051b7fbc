"""Write JSON-lines rows of `text` that the built-in tokenizer turns into at least N tokens each (one token per
letter), for throughput runs on fixed-length rows:  python bench/make_rows.py OUT.jsonl ROWS TOKENS"""

import json
import random
import sys

out, rows, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
with open(out, "w") as f:
    for _ in range(rows):
        f.write(
            json.dumps(
                {"text": " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(tokens + 8))}
            )
            + "\n"
        )
