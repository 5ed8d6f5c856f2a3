"""Fidelity to llama.cpp on the real default model, SmolLM2-135M-Instruct Q4_1.

The reference data in tests/data came from llama.cpp itself (see tests/data/README.md).
Three paths are checked. The pure path streaming its weights (--pack off) evaluates about
0.3 tokens per second here, so it runs a subset that keeps CI within its budget:
  * greedy: the first reference prompt, 8 generated tokens (llama.cpp has 48),
    teacher-forced;
  * perplexity: the first 32 tokens of the reference text, against llama.cpp's own mean
    negative log-likelihood over the same 32 tokens (tests/data/*.nll.json);
  * memory: a CLI run with -c 2048, a short prompt and 16 tokens.
The packed pure path (--pack on) and the C accelerator run the full greedy checks (see
their classes). `tools/bench.py` and the README report the full-length figures.
The accelerated path computes llama.cpp's own float operations and is held to the issue's
criterion: all four prompts, every position, top-5 logits equal to the reference's.
"""

import json
import math
import os
import re
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import picolm  # noqa: E402

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
REFERENCE = os.path.join(HERE, "data", "smollm2-135m-instruct-q4_1.llamacpp.json")
NLL_REFERENCE = os.path.join(HERE, "data", "smollm2-135m-instruct-q4_1.nll.json")
GREEDY_PROMPTS = 1
GREEDY_TOKENS = 8
CLI_TOKENS = 16
NEAR_TIE = 0.3
PPL_TOKENS = 32
THREADS = 2


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def log_softmax_at(logits, index):
    top = max(logits)
    return logits[index] - top - math.log(math.fsum(math.exp(v - top) for v in logits))


@unittest.skipUnless(os.path.exists(MODEL), "the default model is absent: "
                     "run python3 tools/get_model.py (CI does)")
class SmolLM2Fidelity(unittest.TestCase):
    """The pure Python path streaming its weights (--pack off), on the subset named at
    the top of this file."""
    accelerate, pack = False, "off"
    greedy_prompts, greedy_tokens, ppl_tokens = GREEDY_PROMPTS, GREEDY_TOKENS, PPL_TOKENS
    near_tie = NEAR_TIE  # where llama.cpp's own top two are closer, another argmax is allowed
    top5_tolerance = None  # how far our logits of llama.cpp's top five may be (None: unchecked)

    @classmethod
    def setUpClass(cls):
        cls.reference = load_json(REFERENCE)
        cls.model = picolm.Model(MODEL, n_ctx=600, threads=THREADS, accelerate=cls.accelerate,
                                 pack=cls.pack)

    @classmethod
    def tearDownClass(cls):
        cls.model.close()

    def test_greedy_matches_llamacpp(self):
        """Teacher-forced over llama.cpp's own greedy continuation: at every position our
        argmax is llama.cpp's token, or else one of llama.cpp's top five whose logit is
        within near_tie of llama.cpp's best there; and our logits of its top five are
        within top5_tolerance of its own.

        The issue asks for 0.05. llama.cpp re-quantizes every activation to 8 bits, so its
        logits sit 0.1-0.6 away from the exact computation, and its own batched and
        one-token evaluations of this model disagree by 0.25 at a position of these
        prompts; an exact engine (ours) swaps such near-ties. Matching to 0.05 takes
        reproducing ggml's float32 arithmetic bit for bit (see the README)."""
        for case in self.reference["greedy"][:self.greedy_prompts]:
            self.model.reset()
            logits = self.model.eval(case["prompt_ids"])
            for at, expected in enumerate(case["gen_ids"][:self.greedy_tokens]):
                ours = max(range(len(logits)), key=logits.__getitem__)
                theirs = dict(case["top5"][at])
                if ours != expected:
                    self.assertIn(ours, theirs, "prompt %r, token %d: ours %d is not in "
                                  "llama.cpp's top 5" % (case["prompt"], at, ours))
                    self.assertLess(theirs[expected] - theirs[ours], self.near_tie,
                                    "prompt %r, token %d: ours %d, llama.cpp %d"
                                    % (case["prompt"], at, ours, expected))
                if self.top5_tolerance is not None:
                    for token, value in theirs.items():
                        self.assertLessEqual(abs(logits[token] - value), self.top5_tolerance,
                                             "prompt %r, token %d: logit of %d"
                                             % (case["prompt"], at, token))
                logits = self.model.eval([expected])

    def logits_of(self, ids):
        """The logits of every position of ids, evaluated from the start."""
        self.model.reset()
        return [self.model.eval([token]) for token in ids]

    def test_perplexity_within_half_percent(self):
        nll = load_json(NLL_REFERENCE)
        ids = self.reference["ppl"]["ids"]
        self.assertEqual(nll["ids"], ids)
        total = 0.0
        for i, logits in enumerate(self.logits_of(ids[:self.ppl_tokens])):
            total -= log_softmax_at(logits, ids[i + 1])
        ours = math.exp(total / self.ppl_tokens)
        theirs = math.exp(nll["prefix_mean_nll"]["batched"][str(self.ppl_tokens)])
        self.assertLess(abs(ours / theirs - 1.0), 0.005,
                        "perplexity over %d tokens: ours %.4f, llama.cpp %.4f"
                        % (self.ppl_tokens, ours, theirs))


    def cli_run(self):
        """One CLI run with -c 2048, a short prompt and CLI_TOKENS tokens, shared by
        the tests below: (stdout, stderr)."""
        cls = type(self)
        if "_cli" not in cls.__dict__:
            # Measures the streaming path (weights read through the map, never copied
            # into RAM), which is what the memory figures below are about.
            proc = subprocess.run(
                [sys.executable, os.path.join(ROOT, "picolm.py"), MODEL, "-p",
                 self.reference["greedy"][0]["prompt"], "-n", str(CLI_TOKENS), "-t", "0",
                 "-c", "2048", "-j", "1"]
                + ([] if self.accelerate else ["--no-accel", "--pack", self.pack]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=1800)
            self.assertEqual(proc.returncode, 0, proc.stderr.decode())
            cls._cli = (proc.stdout.decode(), proc.stderr.decode())
        return cls._cli

    def memory_figure(self, pattern):
        stderr = self.cli_run()[1]
        return float(re.search(pattern, stderr).group(1)), stderr

    def test_cli_prints_the_api_text(self):
        """stdout holds what Model.generate yields, a newline, and nothing else."""
        expected = "".join(self.model.generate(self.reference["greedy"][0]["prompt"],
                                               max_tokens=CLI_TOKENS, temperature=0.0))
        self.assertEqual(self.cli_run()[0], expected + "\n")

    def test_cli_full_context_memory(self):
        """RssAnon plus the FP16 KV cache of all 2048 positions stays within 90 MB (the
        accelerator may add 16 MB)."""
        full, stderr = self.memory_figure(
            r"at full context \(2048 positions\) about ([\d.]+) MB")
        self.assertLessEqual(full, 90.0 + (16.0 if self.accelerate else 0.0), stderr)

    def test_cli_peak_memory(self):
        """With -c 2048, a short prompt and 16 tokens peak at or under 40 MB of RssAnon
        (the accelerator may add 16 MB)."""
        peak, stderr = self.memory_figure(r"RssAnon peak ([\d.]+) MB")
        self.assertLessEqual(peak, 40.0 + (16.0 if self.accelerate else 0.0), stderr)


@unittest.skipUnless(os.path.exists(MODEL), "the default model is absent: "
                     "run python3 tools/get_model.py (CI does)")
class SmolLM2FidelityPacked(SmolLM2Fidelity):
    """The pure path with its weights packed (--pack on), two processes: fast enough for
    all four reference prompts with all their tokens, and perplexity over the first 128
    tokens of the reference text (all 511 would add minutes to CI; the README gives the
    full figure)."""
    pack = "on"
    greedy_prompts, greedy_tokens, ppl_tokens = 4, 48, 128

    def packed_figure(self):
        return self.memory_figure(r"weights packed into RAM, (\d+) MB")[0]

    def test_cli_peak_memory(self):
        """Packing is a choice made for speed, so the streaming path's 40 MB does not
        apply: RssAnon stays within the packed size stderr reports (which counts the
        packed KV cache at full context) plus those 40 MB."""
        peak, stderr = self.memory_figure(r"RssAnon peak ([\d.]+) MB")
        self.assertLessEqual(peak, self.packed_figure() + 40.0, stderr)

    def test_cli_full_context_memory(self):
        """Likewise at full context: the packed size plus the streaming path's 90 MB."""
        full, stderr = self.memory_figure(
            r"at full context \(2048 positions\) about ([\d.]+) MB")
        self.assertLessEqual(full, self.packed_figure() + 90.0, stderr)


@unittest.skipUnless(os.path.exists(MODEL), "the default model is absent: "
                     "run python3 tools/get_model.py (CI does)")
@unittest.skipUnless(picolm.load_accelerator()[0] is not None,
                     "no C accelerator here: %s" % picolm.load_accelerator()[1])
class SmolLM2FidelityAccelerated(SmolLM2Fidelity):
    """The C accelerator, fast enough for the full checks: all four reference prompts
    with all their generated tokens, and perplexity over all 512 tokens. It computes
    llama.cpp's float operations, so it is held to the issue's 0.05 and its top-5 logits to
    1e-4 (the reference stores them with 4 decimals; we measured at most 5.0e-5)."""
    accelerate = True
    greedy_prompts, greedy_tokens, ppl_tokens = 4, 48, 511
    near_tie, top5_tolerance = 0.05, 1e-4

    def logits_of(self, ids):
        """In one batch, as llama.cpp's perplexity reference was made (a batch attends in
        another summation order than single tokens do, in llama.cpp and here)."""
        self.model.reset()
        flat = self.model.accel.forward_all(ids, 0)
        nv = self.model.accel.n_vocab
        return [flat[i * nv:(i + 1) * nv] for i in range(len(ids))]

    def test_free_running_greedy_matches_llamacpp(self):
        """Greedy generation from each reference prompt gives llama.cpp's tokens."""
        for case in self.reference["greedy"]:
            text = "".join(self.model.generate(case["prompt_ids"], max_tokens=len(case["gen_ids"]),
                                               temperature=0.0))
            self.assertEqual(self.model.tokens[len(case["prompt_ids"]):], case["gen_ids"][:-1])
            self.assertEqual(text, self.model.detokenize(case["gen_ids"]))


if __name__ == "__main__":
    unittest.main()
