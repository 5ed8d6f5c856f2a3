#!/usr/bin/env python3
"""Measures picolm on one model: prefill and generation speed, time to first token, memory.

    python3 tools/bench.py [MODEL] [--configs packed-1,packed-2,accel-1,accel-2]
                           [--prompt-tokens 128] [--gen-tokens 64] [--llama-python PY]
    python3 tools/bench.py [MODEL] --agent accel-2 [--repeats 5]   # --json and --cache costs

A configuration is a backend and a thread count: `pure` (the standard-library path
streaming its weights from the map, -j N worker processes), `packed` (the same with the
weights packed into big-integer columns, --pack on), `pure_exact` and `packed_exact` (the
same with --arithmetic exact), `accel` (the C accelerator, N threads) or `llama` (llama.cpp through
llama-cpp-python, run by the interpreter given with --llama-python, e.g. that of a
throw-away virtual environment: it is never a dependency of picolm). Each configuration
runs in a fresh process, so its peak memory (RssAnon, plus RssShmem: the block a -j N
model shares with its workers, which holds the KV cache) is its own; the figures of one
run are printed as a table, as ratios against the first configuration, and as JSON.
Prefill is timed on a prompt of exactly --prompt-tokens tokens (cut from the GPL text in
tests/data); generation is greedy, --gen-tokens tokens, and its rate counts the tokens
after the first.
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


def prompt_ids(tokenize, n):
    with open(TEXT, encoding="utf-8") as f:
        return tokenize(f.read())[:n]


def measure(model_path, backend, threads, prompt_tokens, gen_tokens):
    """One configuration, in this process; returns a dict of figures."""
    if backend == "llama":
        return measure_llama(model_path, threads, prompt_tokens, gen_tokens)
    watch = picolm.MemoryWatch()
    start = time.perf_counter()
    with picolm.Model(model_path, n_ctx=prompt_tokens + gen_tokens + 8, threads=threads,
                      accelerate=backend == "accel",
                      pack="on" if backend.startswith("packed") else "off",
                      arithmetic="exact" if backend.endswith("_exact") else "llama.cpp") as model:
        if (model.accel is not None) != (backend == "accel"):
            raise SystemExit("bench: %s asked for, got %s" % (backend, model.backend))
        load_seconds = time.perf_counter() - start
        ids = prompt_ids(model.tokenize, prompt_tokens)
        handoff_us = None
        if isinstance(model.matmul, picolm.ParallelMatmul):
            t = time.perf_counter()
            for _ in range(200):
                model.matmul.ping()
            handoff_us = (time.perf_counter() - t) / 200 * 1e6
        t0 = time.perf_counter()
        token = model.eval_greedy(ids)  # greedy as Model.generate does it at temperature 0
        prefill = time.perf_counter() - t0
        watch.sample()
        first_token = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(gen_tokens - 1):
            token = model.eval_greedy([token])
            watch.sample()
        generation = time.perf_counter() - t1
        worker_rss = 0
        if isinstance(model.matmul, picolm.ParallelMatmul):
            worker_rss = sum(picolm.resident_bytes(w.pid, shared=False) or 0
                             for w in model.matmul.workers)
    return figures(backend, threads, load_seconds, len(ids), prefill, first_token,
                   gen_tokens, generation, watch.peak, worker_rss, handoff_us)


def measure_agent(model_path, backend, threads, gen_tokens, repeats):
    """What an agent pays: generation with and without --json, and time to first token
    with a cold and a warm --cache for a ~300-token system prompt plus a short question.
    Plain and --json runs alternate `repeats` times and the medians are reported (the
    machine is shared: single runs vary by 30%); every --json run builds the token
    index afresh, as every CLI run does."""
    import statistics
    import tempfile
    with picolm.Model(model_path, n_ctx=1024, threads=threads,
                      accelerate=backend == "accel") as model:
        with open(TEXT, encoding="utf-8") as f:
            system = model.detokenize(model.tokenize(f.read())[:300])
        prompt = ("<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\nGive the name and "
                  "year of this licence as JSON.<|im_end|>\n<|im_start|>assistant\n" % system)
        rates = {"plain": [], "json": []}
        for _ in range(repeats):
            for label, grammar in (("plain", None), ("json", picolm.JsonGrammar())):
                model.tokenizer.__dict__.pop("_json_index", None)   # as in a fresh process
                stats = {}
                for _ in model.generate(prompt, max_tokens=gen_tokens, temperature=0.0,
                                        stats=stats, grammar=grammar):
                    pass
                rates[label].append(max(0, stats["generated_tokens"] - 1)
                                    / max(stats["generation_seconds"], 1e-9))
        # adjacent runs share the machine's load: the ratio is the median of the pairs'
        pair_ratio = statistics.median(j / p for p, j in zip(rates["plain"], rates["json"]))
        rates = {label: statistics.median(r) for label, r in rates.items()}
        with tempfile.TemporaryDirectory() as tmp:
            cache = os.path.join(tmp, "prompt.kv")
            first = {}
            for label in ("cold", "warm"):
                stats = {}
                for _ in model.generate(prompt, max_tokens=2, temperature=0.0,
                                        stats=stats, cache=cache):
                    pass
                first[label] = stats["first_token_seconds"]
    return dict(config="%s -j %d agent" % (backend, threads),
                generation_tok_s=round(rates["plain"], 3),
                json_generation_tok_s=round(rates["json"], 3),
                json_ratio=round(pair_ratio, 3),
                cold_first_token_s=round(first["cold"], 3),
                warm_first_token_s=round(first["warm"], 3),
                prefill_skipped=round(1 - first["warm"] / first["cold"], 3),
                repeats=repeats)


def measure_llama(model_path, threads, prompt_tokens, gen_tokens):
    from llama_cpp import Llama  # only in the interpreter given with --llama-python
    watch = picolm.MemoryWatch()
    start = time.perf_counter()
    llm = Llama(model_path, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_seconds = time.perf_counter() - start
    ids = prompt_ids(lambda text: llm.tokenize(text.encode(), add_bos=False), prompt_tokens)
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    watch.sample()
    logits = llm.scores[llm.n_tokens - 1]
    token = int(logits.argmax())
    first_token = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(gen_tokens - 1):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        watch.sample()
    generation = time.perf_counter() - t1
    return figures("llama", threads, load_seconds, len(ids), prefill, first_token,
                   gen_tokens, generation, watch.peak, 0, None)


def figures(backend, threads, load_s, n_prompt, prefill, first_token, gen_tokens,
            generation, peak_rss, worker_rss, handoff_us):
    return dict(
        config="%s -j %d" % (backend, threads), load_s=round(load_s, 3),
        prefill_tok_s=round(n_prompt / prefill, 3),
        generation_tok_s=round((gen_tokens - 1) / generation, 3) if gen_tokens > 1 else None,
        time_to_first_token_s=round(first_token, 3),
        peak_memory_mb=round(peak_rss / 2**20, 1),
        workers_rss_anon_mb=round(worker_rss / 2**20, 1),
        handoff_us=round(handoff_us, 1) if handoff_us is not None else None,
        prompt_tokens=n_prompt, gen_tokens=gen_tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?",
                        default=os.path.join(ROOT, picolm.DEFAULT_MODEL))
    parser.add_argument("--configs", default="packed-1,packed-2,accel-1,accel-2",
                        help="comma-separated BACKEND-THREADS (backends: pure, packed, "
                             "pure_exact, packed_exact, accel, llama)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--llama-python", help="a Python that can import llama_cpp")
    parser.add_argument("--agent", metavar="BACKEND-THREADS",
                        help="instead: --json and --cache costs for one configuration")
    parser.add_argument("--repeats", type=int, default=5,
                        help="with --agent: plain/--json pairs to take the medians of")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: one configuration
    args = parser.parse_args()
    if args.agent is not None:
        backend, threads = args.agent.rsplit("-", 1)
        print(json.dumps(measure_agent(args.model, backend, int(threads), args.gen_tokens,
                                       args.repeats),
                         indent=1))
        return
    if args.one is not None:
        backend, threads = args.one.rsplit("-", 1)
        print(json.dumps(measure(args.model, backend, int(threads), args.prompt_tokens,
                                 args.gen_tokens)))
        return
    rows = []
    for config in args.configs.split(","):
        python = sys.executable
        if config.startswith("llama"):
            if not args.llama_python:
                print("bench: skipping %s (no --llama-python)" % config, file=sys.stderr)
                continue
            python = args.llama_python
        out = subprocess.check_output([
            python, os.path.abspath(__file__), args.model, "--one", config,
            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)])
        rows.append(json.loads(out.decode().strip().splitlines()[-1]))
        print("bench: measured %s" % config, file=sys.stderr, flush=True)
    header = ("config", "load s", "prefill tok/s", "gen tok/s", "first token s",
              "memory MB", "workers MB", "hand-off us")
    print("model: %s, Python %s (%s), %d-token prompt, %d generated" % (
        os.path.basename(args.model), sys.version.split()[0], sys.executable,
        args.prompt_tokens, args.gen_tokens))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["config"], r["load_s"], r["prefill_tok_s"], r["generation_tok_s"],
            r["time_to_first_token_s"], r["peak_memory_mb"], r["workers_rss_anon_mb"],
            r["handoff_us"] if r["handoff_us"] is not None else "-"))
    by_config = {r["config"]: r for r in rows}
    for a, b in (("pure -j 2", "pure -j 1"), ("packed -j 2", "packed -j 1"),
                 ("packed_exact -j 2", "packed_exact -j 1"), ("packed_exact -j 1", "packed -j 1"),
                 ("packed -j 1", "pure -j 1"), ("packed -j 2", "pure -j 2"),
                 ("accel -j 2", "packed -j 2"), ("accel -j 2", "llama -j 2"),
                 ("accel -j 1", "llama -j 1")):
        if a in by_config and b in by_config:
            print("ratio %s / %s: prefill %.2fx, generation %.2fx" % (
                a, b, by_config[a]["prefill_tok_s"] / by_config[b]["prefill_tok_s"],
                (by_config[a]["generation_tok_s"] or 0) / (by_config[b]["generation_tok_s"] or 1)))
    print(json.dumps({"model": os.path.basename(args.model), "python": sys.version.split()[0],
                      "python_executable": sys.executable, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
