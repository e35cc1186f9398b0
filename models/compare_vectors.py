#!/usr/bin/env python3
"""Compares two vector files written by embed_reference.py / embed-bench --out.

    compare_vectors.py A.json B.json

Both must hold the same sentences in the same order. Prints one JSON object with the minimum
and mean cosine similarity over the sentences and the sentence with the minimum. Standard
library only.
"""

import json
import math
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    a, b = (json.load(open(p, encoding="utf-8")) for p in sys.argv[1:3])
    if a["sentences"] != b["sentences"]:
        sys.exit("the two files do not hold the same sentences in the same order")
    cosines = []
    for u, v in zip(a["vectors"], b["vectors"]):
        if len(u) != len(v):
            sys.exit(f"dimensions differ: {len(u)} and {len(v)}")
        dot = sum(x * y for x, y in zip(u, v))
        nu = math.sqrt(sum(x * x for x in u))
        nv = math.sqrt(sum(y * y for y in v))
        cosines.append(dot / (nu * nv) if nu and nv else 0.0)
    i = min(range(len(cosines)), key=cosines.__getitem__) if cosines else None
    print(json.dumps({
        "sentences": len(cosines),
        "cosine_min": round(cosines[i], 9) if cosines else None,
        "cosine_mean": round(sum(cosines) / len(cosines), 9) if cosines else None,
        "worst_sentence": a["sentences"][i][:80] if cosines else None,
    }))


if __name__ == "__main__":
    main()
