#!/usr/bin/env python3
"""Measures picolm on one model: prefill and generation speed, time to first token, memory.

    python3 tools/bench.py [MODEL] [--threads 1,2] [--prompt-tokens 128] [--gen-tokens 64]

Each configuration runs in a fresh process (so its peak RssAnon is its own) and the
figures of one run are printed as a table, as ratios, and as JSON. Prefill is timed on a
prompt of exactly --prompt-tokens tokens (cut from the GPL text in tests/data); generation
is greedy, --gen-tokens tokens, and its rate counts the tokens after the first.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import picolm  # noqa: E402  (after the path is set)

TEXT = os.path.join(ROOT, "tests", "data", "ppl-text.txt")


def measure(model_path, threads, prompt_tokens, gen_tokens):
    """One configuration, in this process; returns a dict of figures."""
    watch = picolm.MemoryWatch()
    start = time.perf_counter()
    with picolm.Model(model_path, n_ctx=prompt_tokens + gen_tokens + 8,
                      threads=threads) as model:
        load_seconds = time.perf_counter() - start
        with open(TEXT, encoding="utf-8") as f:
            ids = model.tokenize(f.read())[:prompt_tokens]
        stats = {}
        sampler = picolm.Sampler(temperature=0.0)
        t0 = time.perf_counter()
        logits = model.eval(ids)
        prefill = time.perf_counter() - t0
        watch.sample()
        token = sampler.sample(logits)
        first_token = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(gen_tokens - 1):
            logits = model.eval([token])
            token = sampler.sample(logits)
            watch.sample()
        generation = time.perf_counter() - t1
        worker_rss = 0
        if threads > 1:
            worker_rss = sum(picolm.rss_anon_bytes(w.pid) or 0
                             for w in model.matmul.workers)
        stats.update(
            threads=threads, load_s=round(load_seconds, 3),
            prefill_tok_s=round(len(ids) / prefill, 3),
            generation_tok_s=round((gen_tokens - 1) / generation, 3) if gen_tokens > 1 else None,
            time_to_first_token_s=round(first_token, 3),
            peak_rss_anon_mb=round(watch.peak / 2**20, 1),
            workers_rss_anon_mb=round(worker_rss / 2**20, 1),
            prompt_tokens=len(ids), gen_tokens=gen_tokens)
    return stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?",
                        default=os.path.join(ROOT, picolm.DEFAULT_MODEL))
    parser.add_argument("--threads", default="1,2", help="comma-separated -j values")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one config
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.model, args.one, args.prompt_tokens, args.gen_tokens)))
        return
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        out = subprocess.check_output([
            sys.executable, os.path.abspath(__file__), args.model, "--one", str(threads),
            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)])
        rows.append(json.loads(out.decode().strip().splitlines()[-1]))
        print("measured -j %d" % threads, file=sys.stderr, flush=True)
    header = ("config", "prefill tok/s", "gen tok/s", "first token s", "RssAnon MB",
              "workers MB")
    print("model: %s, Python %s" % (os.path.basename(args.model), sys.version.split()[0]))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| pure -j %d | %s | %s | %s | %s | %s |" % (
            r["threads"], r["prefill_tok_s"], r["generation_tok_s"],
            r["time_to_first_token_s"], r["peak_rss_anon_mb"], r["workers_rss_anon_mb"]))
    base = rows[0]
    for r in rows[1:]:
        print("ratio -j %d / -j %d: prefill %.2fx, generation %.2fx" % (
            r["threads"], base["threads"], r["prefill_tok_s"] / base["prefill_tok_s"],
            (r["generation_tok_s"] or 0) / (base["generation_tok_s"] or 1)))
    print(json.dumps({"model": os.path.basename(args.model), "python": sys.version.split()[0],
                      "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
