"""Fidelity to llama.cpp on the real default model, SmolLM2-135M-Instruct Q4_1.

The reference data in tests/data came from llama.cpp itself (see tests/data/README.md).
Three paths are checked, all computing llama.cpp's own float32 operations (this model's
matrices are Q4_1 and Q8_0), so all are held to the issue's criterion: greedy tokens equal
to llama.cpp's, a divergence allowed only where llama.cpp's own top two are within 0.05,
and llama.cpp's top-5 logits reproduced to 1e-4 (the reference's 4 decimals). The pure
path evaluates about 0.1-0.2 tokens per second here, so it runs subsets that keep CI
within its budget:
  * streamed (--pack off): greedy from the first reference prompt, 4 generated tokens
    (llama.cpp has 48); the logits of that prompt (evaluated at once) and of 3 more
    tokens (the same positions, computed once for both checks) equal to the
    accelerator's bit for bit; perplexity over the first 8 tokens of
    the reference text, evaluated in one batch as llama.cpp's reference was, against
    llama.cpp's own per-token figures (tests/data/*.nll.json); a CLI run with -c 2048, a
    short prompt and 4 tokens, whose text must be the accelerator's, and the memory
    figures of that run;
  * packed (--pack on): greedy from the first prompt, 12 tokens, perplexity over 16
    tokens, the same checks otherwise.
The C accelerator runs the full checks (all four prompts with all their tokens,
perplexity over 511 tokens). `tools/bench.py` and the README report speeds.
The opt-in `--arithmetic exact` (float64, ~10x faster in pure Python) is checked for what
it promises: perplexity within 0.5% and llama.cpp's tokens except at close calls.
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
GREEDY_TOKENS = 4
NEAR_TIE = 0.05  # the issue's: where llama.cpp's own top two are closer, another argmax is allowed
TOP5_TOLERANCE = 1e-4  # the reference stores logits with 4 decimals; we measured at most 5.0e-5
ACCEL_CHECK_TOKENS = 3
PPL_TOKENS = 8
EXACT_NEAR_TIE = 0.3  # --arithmetic exact: how close llama.cpp's best may be to our pick
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
    accelerate, pack, arithmetic = False, "off", "llama.cpp"
    greedy_prompts, greedy_tokens, ppl_tokens = GREEDY_PROMPTS, GREEDY_TOKENS, PPL_TOKENS
    cli_tokens = 4

    @classmethod
    def setUpClass(cls):
        cls.reference = load_json(REFERENCE)
        cls.model = picolm.Model(MODEL, n_ctx=600, threads=THREADS, accelerate=cls.accelerate,
                                 pack=cls.pack, arithmetic=cls.arithmetic)

    @classmethod
    def tearDownClass(cls):
        cls.model.close()

    def greedy_logits(self, case):
        """The logits after case's prompt (evaluated at once), then after each of our
        greedy tokens one by one: enough for the greedy test and the accelerator test,
        which read the same positions, computed once per class and prompt."""
        store = type(self).__dict__.get("_greedy_logits")
        if store is None:
            store = type(self)._greedy_logits = {}
        if case["prompt"] not in store:
            self.model.reset()
            every = [self.model.eval(case["prompt_ids"])]
            for _ in range(max(self.greedy_tokens, ACCEL_CHECK_TOKENS + 1) - 1):
                logits = every[-1]
                every.append(self.model.eval([max(range(len(logits)), key=logits.__getitem__)]))
            store[case["prompt"]] = every
        return store[case["prompt"]]

    def test_greedy_matches_llamacpp(self):
        """Greedy generation from each prompt gives llama.cpp's tokens: a token may differ
        only where llama.cpp's own top two logits are within NEAR_TIE (the continuations
        are unrelated from there on, so the comparison stops); and while the tokens agree,
        our logits of llama.cpp's top five are within TOP5_TOLERANCE of its own."""
        for case in self.reference["greedy"][:self.greedy_prompts]:
            steps = zip(case["gen_ids"][:self.greedy_tokens], self.greedy_logits(case))
            for at, (expected, logits) in enumerate(steps):
                ours = max(range(len(logits)), key=logits.__getitem__)
                top5 = case["top5"][at]
                for token, value in top5:
                    self.assertLessEqual(abs(logits[token] - value), TOP5_TOLERANCE,
                                         "prompt %r, token %d: logit of %d"
                                         % (case["prompt"], at, token))
                if ours != expected:
                    self.assertLess(top5[0][1] - top5[1][1], NEAR_TIE,
                                    "prompt %r, token %d: ours %d, llama.cpp %d"
                                    % (case["prompt"], at, ours, expected))
                    break

    def test_logits_equal_the_accelerators(self):
        """The first reference prompt evaluated at once, then ACCEL_CHECK_TOKENS greedy
        tokens one by one: every logit equal to the C accelerator's, bit for bit."""
        accel, why = picolm.load_accelerator()
        if accel is None:
            self.skipTest("no C accelerator here: %s" % why)
        case = self.reference["greedy"][0]
        with picolm.Model(MODEL, n_ctx=64, accelerate=True) as twin:
            ids = case["prompt_ids"]
            for step, ours in enumerate(self.greedy_logits(case)[:ACCEL_CHECK_TOKENS + 1]):
                theirs = twin.eval(ids)
                self.assertTrue(ours == theirs, "step %d: logits differ by up to %g" % (
                    step, max(abs(a - b) for a, b in zip(ours, theirs))))
                ids = [max(range(len(ours)), key=ours.__getitem__)]

    def logits_of(self, ids):
        """The logits of every position of ids, evaluated from the start in one batch,
        as llama.cpp's perplexity reference was made (a batch attends in another
        summation order than single tokens do, in llama.cpp and here)."""
        self.model.reset()
        return self.model.eval_all(ids)

    def test_perplexity_within_half_percent(self):
        """Perplexity over the first ppl_tokens tokens within 0.5% of llama.cpp's, and
        every token's negative log-likelihood within 1e-4 of its own."""
        nll = load_json(NLL_REFERENCE)
        ids = self.reference["ppl"]["ids"]
        self.assertEqual(nll["ids"], ids)
        theirs = nll["nll_batched"][:self.ppl_tokens]
        ours = [-log_softmax_at(logits, ids[i + 1])
                for i, logits in enumerate(self.logits_of(ids[:self.ppl_tokens]))]
        for i, (a, b) in enumerate(zip(ours, theirs)):
            self.assertLess(abs(a - b), 1e-4, "token %d: ours %.6f, llama.cpp %.6f" % (i, a, b))
        ours, theirs = (math.exp(math.fsum(v) / self.ppl_tokens) for v in (ours, theirs))
        self.assertLess(abs(ours / theirs - 1.0), 0.005,
                        "perplexity over %d tokens: ours %.4f, llama.cpp %.4f"
                        % (self.ppl_tokens, ours, theirs))


    def cli_run(self):
        """One CLI run with -c 2048, a short prompt and cli_tokens tokens, shared by
        the tests below: (stdout, stderr)."""
        cls = type(self)
        if "_cli" not in cls.__dict__:
            # Measures the streaming path (weights read through the map, never copied
            # into RAM), which is what the memory figures below are about.
            proc = subprocess.run(
                [sys.executable, os.path.join(ROOT, "picolm.py"), MODEL, "-p",
                 self.reference["greedy"][0]["prompt"], "-n", str(self.cli_tokens), "-t", "0",
                 "-c", "2048", "-j", "1"]
                + ([] if self.accelerate else ["--no-accel", "--pack", self.pack,
                                               "--arithmetic", self.arithmetic]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=1800)
            self.assertEqual(proc.returncode, 0, proc.stderr.decode())
            cls._cli = (proc.stdout.decode(), proc.stderr.decode())
        return cls._cli

    def memory_figure(self, pattern):
        stderr = self.cli_run()[1]
        return float(re.search(pattern, stderr).group(1)), stderr

    def test_cli_prints_the_api_text(self):
        """stdout holds what Model.generate yields, a newline, and nothing else. With
        llama.cpp's arithmetic the text is generated on the accelerator, whose bits the
        pure path computes (test_logits_equal_the_accelerators), many times faster: so
        this also checks that --no-accel prints the accelerator's text."""
        model = self.model
        if self.arithmetic == "llama.cpp" and not self.accelerate:
            accel, why = picolm.load_accelerator()
            if accel is None:
                self.skipTest("no C accelerator here: %s" % why)
            model = picolm.Model(MODEL, n_ctx=64, accelerate=True)
        try:
            expected = "".join(model.generate(self.reference["greedy"][0]["prompt"],
                                              max_tokens=self.cli_tokens, temperature=0.0))
        finally:
            if model is not self.model:
                model.close()
        self.assertEqual(self.cli_run()[0], expected + "\n")

    def test_cli_full_context_memory(self):
        """Resident memory plus the FP16 KV cache of all 2048 positions stays within 90 MB (the
        accelerator may add 16 MB)."""
        full, stderr = self.memory_figure(
            r"at full context \(2048 positions\) about ([\d.]+) MB")
        self.assertLessEqual(full, 90.0 + (16.0 if self.accelerate else 0.0), stderr)

    def test_cli_peak_memory(self):
        """With -c 2048, a short prompt and cli_tokens tokens peak at or under 40 MB of
        RssAnon+RssShmem, as stderr reports it (the accelerator may add 16 MB)."""
        peak, stderr = self.memory_figure(r"RssAnon\+RssShmem peak ([\d.]+) MB")
        self.assertLessEqual(peak, 40.0 + (16.0 if self.accelerate else 0.0), stderr)


@unittest.skipUnless(os.path.exists(MODEL), "the default model is absent: "
                     "run python3 tools/get_model.py (CI does)")
class SmolLM2FidelityPacked(SmolLM2Fidelity):
    """The pure path with its weights packed (--pack on), two processes: greedy from the
    first reference prompt, 12 tokens, and perplexity over the first 16 tokens of the
    reference text (packing saves the unpacking of the weights, not the float32
    arithmetic, which dominates)."""
    pack = "on"
    greedy_prompts, greedy_tokens, ppl_tokens = 1, 12, 16

    def packed_figure(self):
        return self.memory_figure(r"weights packed into RAM, (\d+) MB")[0]

    def test_cli_peak_memory(self):
        """Packing is a choice made for speed, so the streaming path's 40 MB does not
        apply: RssAnon+RssShmem stays within the packed size stderr reports (which counts the
        packed KV cache at full context) plus those 40 MB."""
        peak, stderr = self.memory_figure(r"RssAnon\+RssShmem peak ([\d.]+) MB")
        self.assertLessEqual(peak, self.packed_figure() + 40.0, stderr)

    def test_cli_full_context_memory(self):
        """Likewise at full context: the packed size plus the streaming path's 90 MB."""
        full, stderr = self.memory_figure(
            r"at full context \(2048 positions\) about ([\d.]+) MB")
        self.assertLessEqual(full, self.packed_figure() + 90.0, stderr)


@unittest.skipUnless(os.path.exists(MODEL), "the default model is absent: "
                     "run python3 tools/get_model.py (CI does)")
class SmolLM2FidelityExactArithmetic(SmolLM2FidelityPacked):
    """--arithmetic exact, packed, two processes: float64 instead of llama.cpp's float32
    steps, which llama.cpp's chaotic last bits make land 0.1-0.6 from its logits. What it
    promises, and this checks: perplexity within 0.5% of llama.cpp's over the first 32
    tokens, and teacher-forced over the first prompt's 48 tokens, our pick is llama.cpp's
    or one of its top five within EXACT_NEAR_TIE of its best (measured: at most 0.27)."""
    arithmetic = "exact"
    ppl_tokens = 32
    test_logits_equal_the_accelerators = None  # other arithmetic by design

    def test_greedy_matches_llamacpp(self):
        case = self.reference["greedy"][0]
        self.model.reset()
        logits = self.model.eval(case["prompt_ids"])
        for at, expected in enumerate(case["gen_ids"]):
            ours = max(range(len(logits)), key=logits.__getitem__)
            theirs = dict(case["top5"][at])
            if ours != expected:
                self.assertIn(ours, theirs, "token %d: ours %d not in llama.cpp's top 5" % (at, ours))
                self.assertLess(theirs[expected] - theirs[ours], EXACT_NEAR_TIE,
                                "token %d: ours %d, llama.cpp %d" % (at, ours, expected))
            logits = self.model.eval([expected])

    def test_perplexity_within_half_percent(self):
        nll = load_json(NLL_REFERENCE)
        ids = self.reference["ppl"]["ids"][:self.ppl_tokens + 1]
        ours = [-log_softmax_at(logits, ids[i + 1])
                for i, logits in enumerate(self.logits_of(ids[:-1]))]
        ours = math.exp(math.fsum(ours) / self.ppl_tokens)
        theirs = math.exp(nll["prefix_mean_nll"]["batched"][str(self.ppl_tokens)])
        self.assertLess(abs(ours / theirs - 1.0), 0.005,
                        "perplexity over %d tokens: ours %.4f, llama.cpp %.4f"
                        % (self.ppl_tokens, ours, theirs))


@unittest.skipUnless(os.path.exists(MODEL), "the default model is absent: "
                     "run python3 tools/get_model.py (CI does)")
@unittest.skipUnless(picolm.load_accelerator()[0] is not None,
                     "no C accelerator here: %s" % picolm.load_accelerator()[1])
class SmolLM2FidelityAccelerated(SmolLM2Fidelity):
    """The C accelerator, fast enough for the full checks: all four reference prompts
    with all their generated tokens, and perplexity over all 512 tokens."""
    accelerate = True
    greedy_prompts, greedy_tokens, ppl_tokens = 4, 48, 511
    cli_tokens = 16
    test_logits_equal_the_accelerators = None  # it is the accelerator

    def test_free_running_greedy_matches_llamacpp(self):
        """Greedy generation from each reference prompt gives llama.cpp's tokens."""
        for case in self.reference["greedy"]:
            text = "".join(self.model.generate(case["prompt_ids"], max_tokens=len(case["gen_ids"]),
                                               temperature=0.0))
            self.assertEqual(self.model.tokens[len(case["prompt_ids"]):], case["gen_ids"][:-1])
            self.assertEqual(text, self.model.detokenize(case["gen_ids"]))


if __name__ == "__main__":
    unittest.main()
