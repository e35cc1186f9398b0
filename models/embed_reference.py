#!/usr/bin/env python3
"""Reference embeddings and throughput of sentence-transformers (PyTorch, CPU) on a local model.

    embed_reference.py MODEL_DIR --sentences FILE [--batch 16] [--threads N] [--runs 3]
                       [--per-call] [--out VECTORS.json]

FILE is a JSON list of strings or one sentence per line. By default the whole list goes to one
`encode(sentences, batch_size=BATCH)` (sentence-transformers sorts it by length first); with
--per-call it goes in calls of BATCH sentences in file order, the request shape that
`embed-bench --batch BATCH` sends to the candle adapter. Prints one JSON object:
{"sentences_per_s": best warm run, "sentences": n, "threads": n, "batch": n, ...}; with --out
it also writes {"model": ..., "sentences": [...], "vectors": [[...], ...]}.

Runs offline (HF_HUB_OFFLINE=1) and loads only from MODEL_DIR. Needs sentence-transformers and
PyTorch: `models/embed-reference-venv` sets up a venv with both and prints its python.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def read_sentences(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            sys.exit(f"{path}: expected a JSON list of strings")
        return data
    return [line for line in text.splitlines() if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--per-call", action="store_true", help="encode in calls of --batch sentences")
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    sentences = read_sentences(args.sentences)

    t0 = time.perf_counter()
    model = SentenceTransformer(args.model_dir, device="cpu", local_files_only=True)
    load_s = time.perf_counter() - t0

    def encode_list(texts):
        return model.encode(texts, batch_size=args.batch, convert_to_numpy=True, show_progress_bar=False)

    def encode():
        if not args.per_call:
            return encode_list(sentences)
        import numpy as np

        parts = [encode_list(sentences[i : i + args.batch]) for i in range(0, len(sentences), args.batch)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    with torch.inference_mode():
        encode()  # warm-up
        best = 0.0
        vectors = None
        for _ in range(max(1, args.runs)):
            t = time.perf_counter()
            vectors = encode()
            dt = time.perf_counter() - t
            best = max(best, len(sentences) / dt if dt > 0 else 0.0)

    result = {
        "engine": f"sentence-transformers (torch {torch.__version__}, cpu)",
        "sentences_per_s": round(best, 2),
        "sentences": len(sentences),
        "threads": threads,
        "batch": args.batch,
        "per_call": args.per_call,
        "runs": args.runs,
        "load_s": round(load_s, 3),
        "dim": int(vectors.shape[1]) if vectors is not None and len(sentences) else 0,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "model": os.path.basename(os.path.normpath(args.model_dir)),
                    "sentences": sentences,
                    "vectors": [[float("%.8g" % x) for x in v] for v in vectors],
                },
                f,
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
