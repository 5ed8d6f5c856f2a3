#!/usr/bin/env python3
"""Measures the tokenizer: construction time and the time to encode 500 tokens.

    python3 tools/bench_tokenizer.py

For each model in models/ (a model whose file is absent is skipped, saying so) it
prints the time to build the tokenizer from the GGUF metadata (best of 2) and the time
a freshly built tokenizer (cold caches) takes to encode a text of 500 tokens cut from
tests/data/ppl-text.txt. Figures only, no pass/fail: the tests do not time anything.
(The former test limits, for reference: construction under 1 s for SmolLM2 and 5 s
for Gemma 3; 500 tokens encoded in under 0.2 s.)
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import picolm  # noqa: E402  (after the path is set)

MODELS = [
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
]
TEXT = os.path.join(ROOT, "tests", "data", "ppl-text.txt")
N_TOKENS = 500


def best_of(runs, fn):
    """The shortest of `runs` timings of fn(), in seconds."""
    best = None
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best


def measure(path):
    """(construction seconds, encode seconds, tokens encoded) for one model."""
    with picolm.GGUFFile(path) as gguf:
        metadata = gguf.metadata
    construction = best_of(2, lambda: picolm.Tokenizer.from_metadata(metadata))
    tok = picolm.Tokenizer.from_metadata(metadata)
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    text = tok.decode(tok.encode(text, add_bos=False)[:N_TOKENS])
    fresh = picolm.Tokenizer.from_metadata(metadata)  # cold caches
    start = time.perf_counter()
    ids = fresh.encode(text)
    encode = time.perf_counter() - start
    return construction, encode, len(ids)


def main():
    print("Python %s" % sys.version.split()[0])
    print("%-8s %14s %16s" % ("model", "construction", "encode %d tok" % N_TOKENS))
    for name, filename in MODELS:
        path = os.path.join(ROOT, "models", filename)
        if not os.path.exists(path):
            print("%-8s skipped: models/%s is absent" % (name, filename))
            continue
        construction, encode, n_ids = measure(path)
        print("%-8s %12.3f s %14.4f s   (%d ids)"
              % (name, construction, encode, n_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
