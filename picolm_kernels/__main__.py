"""Speed of the C forward pass on a GGUF model, and an example of wiring it to picolm.

    python3 -m picolm_kernels [MODEL] [--threads 1,2] [--prompt-tokens 128]
                              [--gen-tokens 64] [--reps 3]

Prefill: one forward of a --prompt-tokens prompt (batched). Generation: --gen-tokens
single-token forwards with greedy picks (argmax in C). Each figure is the median of --reps
runs. The model is described with picolm's own GGUF reader, Config and KVCache.
"""

import argparse
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def open_model(lib, path, threads, n_ctx):
    """(AcceleratedModel, KVCache, GGUFFile) for a picolm-readable model."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import picolm
    import picolm_kernels as pk
    gguf = picolm.GGUFFile(path)
    cfg = picolm.Config(gguf.metadata, gguf.tensors)
    kv = picolm.KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv * cfg.head_dim)
    freq_factors = None
    if "rope_freqs.weight" in gguf.tensors:
        t = gguf.tensors["rope_freqs.weight"]
        freq_factors = list(pk.dequantize(lib, t.type, bytes(t.data), cfg.rope_dim // 2))
    model = pk.AcceleratedModel(lib, path, cfg, pk.gguf_tensor_table(gguf), n_ctx, kv.buf,
                                threads=threads, freq_factors=freq_factors)
    return model, kv, gguf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?",
                        default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import picolm_kernels as pk
    lib = pk.load()
    if lib is None:
        print("picolm_kernels: %s" % pk.reason, file=sys.stderr)
        return 1
    print("library: %s (isa %s)" % (pk.library_path(), lib.pk_isa().decode()))
    rng = random.Random(1)
    for threads in [int(t) for t in args.threads.split(",")]:
        model, kv, gguf = open_model(lib, args.model, threads,
                                     args.prompt_tokens + args.gen_tokens + 1)
        prompt = [rng.randrange(model.n_vocab) for _ in range(args.prompt_tokens)]
        prefill, generation = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            token = model.forward_argmax(prompt, 0)
            prefill.append(len(prompt) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in range(args.gen_tokens):
                token = model.forward_argmax([token], len(prompt) + i)
            generation.append(args.gen_tokens / (time.perf_counter() - t0))
        print("threads %d: prefill %.1f tok/s (%d-token prompt), generation %.1f tok/s "
              "(%d tokens); runs: %s / %s" % (
                  threads, statistics.median(prefill), len(prompt),
                  statistics.median(generation), args.gen_tokens,
                  " ".join("%.0f" % v for v in prefill), " ".join("%.0f" % v for v in generation)))
        model.close()
        kv.close()
        gguf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
