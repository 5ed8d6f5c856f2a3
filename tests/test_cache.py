"""--cache: a warm run prints what a cold run prints, the longest common prefix is
reused, and every kind of bad cache file is ignored with one warning and rebuilt."""
import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import picolm  # noqa: E402
from gguf_writer import make_tiny_llama  # noqa: E402

PICOLM = os.path.join(ROOT, "picolm.py")
PROMPT = "You are a helpful assistant. Answer briefly and exactly. Question: the sky?"
OTHER = "You are a helpful assistant. Answer briefly and exactly. Question: the sea?"


class CacheTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.path = os.path.join(cls.tmp.name, "tiny.gguf")
        make_tiny_llama(cls.path, quant_type="Q8_0", n_ctx_train=256)
        cls.other = os.path.join(cls.tmp.name, "other.gguf")
        make_tiny_llama(cls.other, quant_type="Q8_0", n_ctx_train=256, seed=1)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        self.cache = os.path.join(self.tmp.name, "prompt.kv")
        if os.path.exists(self.cache):
            os.unlink(self.cache)

    def cli(self, prompt=PROMPT, cache=True, model=None, extra=()):
        args = [sys.executable, PICOLM, model or self.path, "-c", "256", "-n", "12",
                "-p", prompt] + list(extra)
        if cache:
            args += ["--cache", self.cache]
        r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout, r.stderr.decode()

    def warnings(self, err):
        return [line for line in err.splitlines() if line.startswith("picolm: warning:")]

    def test_warm_equals_cold_in_process(self):
        """Also with -j 2 on the pure path, whose KV cache lives in the block it shares
        with the worker that attends with half the heads."""
        for accelerate, threads in ((True, 1), (False, 1), (False, 2)):
            for temperature, seed in ((0.0, 1), (0.9, 7)):
                with picolm.Model(self.path, n_ctx=256, accelerate=accelerate,
                                  threads=threads) as m:
                    cold = "".join(m.generate(PROMPT, 12, temperature, 0.9, seed))
                    if os.path.exists(self.cache):
                        os.unlink(self.cache)
                    first = "".join(m.generate(PROMPT, 12, temperature, 0.9, seed,
                                               cache=self.cache))
                with picolm.Model(self.path, n_ctx=256, accelerate=accelerate,
                                  threads=threads) as m:
                    if threads > 1 and not accelerate:
                        self.assertIs(m.kv, m.matmul.kv)
                    stats = {}
                    warm = "".join(m.generate(PROMPT, 12, temperature, 0.9, seed, stats,
                                              cache=self.cache))
                    n_prompt = len(m.tokenize(PROMPT))
                # two tokens evaluated afresh, so the last attends in a batch as cold
                self.assertEqual(stats["cached_tokens"], n_prompt - 2)
                self.assertEqual(cold, first)
                self.assertEqual(cold, warm)

    def test_cli_warm_cold_and_prefix(self):
        cold, _ = self.cli(cache=False, extra=("-t", "0.8", "-s", "5"))
        out, err = self.cli(extra=("-t", "0.8", "-s", "5"))
        self.assertEqual(out, cold)
        self.assertEqual(len(self.warnings(err)), 1)        # absent: created
        out, err = self.cli(extra=("-t", "0.8", "-s", "5"))
        self.assertEqual(out, cold)
        self.assertEqual(self.warnings(err), [])
        with picolm.Model(self.path, n_ctx=256) as m:
            a, b = m.tokenize(PROMPT), m.tokenize(OTHER)
        common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        # the common prefix, leaving two tokens to evaluate (the last one attends in a
        # batch, as in a cold run; these prompts are far shorter than llama.cpp's 512)
        self.assertIn("picolm: Skipping %d cached prompt tokens" % (len(a) - 2), err)
        other_cold, _ = self.cli(OTHER, cache=False)
        other, err = self.cli(OTHER)
        self.assertEqual(other, other_cold)
        self.assertIn("picolm: Skipping %d cached prompt tokens" % min(common, len(b) - 2), err)
        other, err = self.cli(OTHER)           # the file now holds the new prompt
        self.assertIn("picolm: Skipping %d cached prompt tokens" % (len(b) - 2), err)
        self.assertEqual(other, other_cold)

    def test_bad_caches_are_rebuilt(self):
        cold, _ = self.cli(cache=False)
        self.cli()
        with open(self.cache, "rb") as f:
            good = f.read()
        header = len(picolm.STATE_MAGIC) + 8 + picolm.STATE_FINGERPRINT.size
        bad = {"empty": b"", "truncated header": good[:10], "truncated tokens": good[:header + 6],
               "truncated kv": good[:len(good) // 2], "truncated checksum": good[:-1],
               "padded": good + b"\0", "flipped kv byte": flip(good, len(good) // 2),
               "flipped checksum": flip(good, len(good) - 3),
               "flipped token": flip(good, header + 1),
               "other version": good[:8] + b"\x63" + good[9:],
               "garbage": os.urandom(len(good))}
        with picolm.Model(self.other, n_ctx=256) as m:
            m.eval(m.tokenize(PROMPT))
            m.save_state(self.cache, m.tokenize(PROMPT))
        with open(self.cache, "rb") as f:
            bad["other model"] = f.read()
        with picolm.Model(self.path, n_ctx=128) as m:
            m.eval(m.tokenize(PROMPT))
            m.save_state(self.cache, m.tokenize(PROMPT))
        with open(self.cache, "rb") as f:
            bad["other n_ctx"] = f.read()
        for kind, data in bad.items():
            with open(self.cache, "wb") as f:
                f.write(data)
            out, err = self.cli()
            self.assertEqual(out, cold, kind)
            self.assertEqual(len(self.warnings(err)), 1, (kind, err))
            self.assertNotIn("Skipping", err, kind)
            with open(self.cache, "rb") as f:
                self.assertEqual(f.read(), good, kind)       # rewritten, valid
        self.assertEqual(sorted(os.listdir(self.tmp.name)),
                         ["other.gguf", "prompt.kv", "tiny.gguf"])

    def test_failed_save_keeps_the_old_file(self):
        self.cli()
        with open(self.cache, "rb") as f:
            good = f.read()
        with picolm.Model(self.path, n_ctx=256) as m:
            ids = m.tokenize(OTHER)
            with mock.patch.object(picolm.os, "replace", side_effect=OSError(28, "No space")):
                out = "".join(m.generate(ids, 5, 0.0, 0.9, 1, cache=self.cache))
            self.assertTrue(out is not None)
            with mock.patch.object(picolm.os, "fsync", side_effect=OSError(5, "I/O error")):
                m.eval(ids[:1]) if not m.tokens else None
                self.assertFalse(m.save_state(self.cache, m.tokens[:len(ids)]))
        with open(self.cache, "rb") as f:
            self.assertEqual(f.read(), good)
        self.assertEqual(sorted(os.listdir(self.tmp.name)),
                         ["other.gguf", "prompt.kv", "tiny.gguf"])


def flip(data, at):
    return data[:at] + bytes((data[at] ^ 0x40,)) + data[at + 1:]


MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


@unittest.skipUnless(os.path.exists(MODEL), "the default model is absent: "
                     "run python3 tools/get_model.py (CI does)")
@unittest.skipUnless(picolm.load_accelerator()[0] is not None,
                     "no C accelerator here: %s" % picolm.load_accelerator()[1])
class SmolLM2WarmEqualsColdTest(unittest.TestCase):
    """On a real model, whose close calls show the last bits: greedy and seeded sampling
    from a warm cache print what a cold run prints (the accelerator: the pure path
    computes the same bits). Evaluating only the last prompt token afresh attended in
    the single-token order, where the cold run had used the batch order, and changed
    the sampled text of the third prompt."""

    def test_warm_equals_cold(self):
        with open(os.path.join(ROOT, "tests", "data",
                               "smollm2-135m-instruct-q4_1.llamacpp.json"), encoding="utf-8") as f:
            prompts = [case["prompt"] for case in json.load(f)["greedy"]]
        with tempfile.TemporaryDirectory() as tmp, \
                picolm.Model(MODEL, n_ctx=256, threads=2, accelerate=True) as m:
            for i, prompt in enumerate(prompts):
                for temperature, seed in ((0.0, 1), (0.8, 5)):
                    cache = os.path.join(tmp, "%d-%s.kv" % (i, temperature))
                    cold = "".join(m.generate(prompt, 40, temperature, 0.9, seed))
                    for _ in range(2):  # the run that writes the cache, then a warm one
                        stats = {}
                        text = "".join(m.generate(prompt, 40, temperature, 0.9, seed, stats,
                                                  cache=cache))
                        self.assertEqual(text, cold, (i, temperature, stats["cached_tokens"]))
                    self.assertGreater(stats["cached_tokens"], 0)


if __name__ == "__main__":
    unittest.main()
