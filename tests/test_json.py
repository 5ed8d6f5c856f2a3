"""--json / --json-schema end to end: fuzz tests over sampling settings, budgets,
schemas and prompts on a random tiny model and on SmolLM2-135M (in-process through
Model.generate, plus CLI runs); every output parses with json.loads and satisfies its
schema. Also: sampling after a refused token draws among exactly the allowed tokens."""
import collections
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import unittest
import unittest.mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import picolm  # noqa: E402
from gguf_writer import make_tiny_llama  # noqa: E402
from test_grammar import validate_top  # noqa: E402

PICOLM = os.path.join(ROOT, "picolm.py")
FUZZ = int(os.environ.get("PICOLM_FUZZ", "1"))

SCHEMAS = [
    None,
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
     "required": ["ok"]},
    {"type": ["string", "null"], "minLength": 2, "maxLength": 6},
    {"enum": [1, "two", [3], {"four": 4}]},
    {"type": "object", "properties": {"k": {"const": "v"}, "n": {"type": "null"}},
     "required": ["k", "n"], "additionalProperties": {"type": "integer"}},
]
PROMPTS = ["Reply with a JSON object describing a cat.", "Once upon a time",
           '{"name": "', "the quick brown fox", "[1, 2,"]


class TinyModelCase(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.path = os.path.join(cls.tmp.name, "tiny.gguf")
        make_tiny_llama(cls.path, quant_type="Q8_0", n_ctx_train=256)
        cls.model = picolm.Model(cls.path, n_ctx=256)

    @classmethod
    def tearDownClass(cls):
        cls.model.close()
        cls.tmp.cleanup()

    def run_json(self, prompt, n, temperature, top_p, seed, schema, n_ctx=None):
        grammar = picolm.JsonGrammar(schema)
        stats = {}
        text = "".join(self.model.generate(prompt, n, temperature, top_p, seed, stats,
                                           grammar=grammar))
        return text, stats


class JsonFuzzTest(TinyModelCase):

    def check(self, text, schema, context):
        try:
            value = json.loads(text)
        except ValueError as e:
            self.fail("%s: %r does not parse: %s" % (context, text, e))
        self.assertTrue(validate_top(schema, value), "%s: %r" % (context, text))

    def test_fuzz(self):
        rng = random.Random(4)
        for run in range(320 * FUZZ):
            schema = rng.choice(SCHEMAS)
            prompt = rng.choice(PROMPTS)
            temperature = rng.choice([0.0, rng.uniform(0.0, 1.5)])
            top_p = rng.uniform(0.5, 1.0)
            n = rng.choice([4, 5, 8, rng.randint(4, 40), rng.randint(4, 200)])
            seed = rng.randrange(1 << 30)
            context = "run %d: schema %r prompt %r -t %.2f -k %.2f -n %d -s %d" % (
                run, schema, prompt, temperature, top_p, n, seed)
            try:
                text, stats = self.run_json(prompt, n, temperature, top_p, seed, schema)
            except picolm.PicoError as e:     # the budget cannot hold the shortest value
                grammar = picolm.JsonGrammar(schema)
                self.assertGreater(grammar.completion_length(grammar.start), n, context)
                self.assertIn("--json needs", str(e))
                continue
            self.check(text, schema, context)
            self.assertLessEqual(stats["generated_tokens"], n, context)

    def test_fuzz_pure_python(self):
        """A few runs on the pure Python forward pass (the above may be accelerated)."""
        rng = random.Random(5)
        with picolm.Model(self.path, n_ctx=256, accelerate=False) as model:
            for run in range(8 * FUZZ):
                schema = rng.choice(SCHEMAS[:3])
                n = rng.randint(20, 40)
                grammar = picolm.JsonGrammar(schema)
                text = "".join(model.generate(rng.choice(PROMPTS), n, rng.uniform(0, 1.5),
                                              rng.uniform(0.5, 1.0), run, grammar=grammar))
                self.check(text, schema, "pure run %d" % run)

    def test_n8_gives_complete_object(self):
        for seed in range(20):
            text, _ = self.run_json("Once upon a time", 8, 1.5, 1.0, seed, None)
            self.assertIsInstance(json.loads(text), dict)

    def test_context_bounds_the_value(self):
        """A prompt that leaves few positions: the value still closes in time."""
        prompt = self.model.tokenize("a " * 400)[:250]
        for seed in range(10):
            text, stats = self.run_json(prompt, 200, 1.2, 1.0, seed, None)
            self.assertIsInstance(json.loads(text), dict)

    def test_greedy_is_reproducible_and_unconstrained_unchanged(self):
        a = self.run_json("hello", 30, 0.0, 0.9, 1, None)[0]
        b = self.run_json("hello", 30, 0.0, 0.9, 1, None)[0]
        self.assertEqual(a, b)
        plain1 = "".join(self.model.generate("hello", 20, 0.7, 0.9, 3))
        plain2 = "".join(self.model.generate("hello", 20, 0.7, 0.9, 3, grammar=None))
        self.assertEqual(plain1, plain2)


SMOLLM2 = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
CHAT = "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n"
SMOL_PROMPTS = [      # the first four ask for JSON, the others do not
    CHAT % "Describe a cat as a JSON object with its name and age.",
    CHAT % "List three colours as a JSON array.",
    "<|im_start|>system\nYou answer only in JSON.<|im_end|>\n" + CHAT % "Is water wet?",
    'The answer, as JSON: {"ok": ',
    "Once upon a time",
    CHAT % "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Le château de Versailles est ",
]
SMOL_SCHEMAS = [
    None,
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"enum": ["red", "green", "blue", 7, None]},
    {"type": "array", "items": {"type": "string", "maxLength": 8},
     "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number"},
                                      "note": {"type": "null"}},
     "required": ["ok", "score"]},
    {"type": "integer"},
    {"type": "boolean"},
    {"type": "number"},
    {"type": "string", "maxLength": 5},
    {"type": "null"},
    {"type": ["string", "null"], "minLength": 2, "maxLength": 6},
    {"type": "object", "required": ["items"],
     "properties": {"items": {"type": "array", "maxItems": 2, "items": {
         "type": "object", "required": ["id"],
         "properties": {"id": {"type": "integer"}, "tag": {"enum": ["a", "b"]}}}}}},
]


def smol_run_settings(rng):
    """Sampling settings, a budget, a schema and a prompt for one fuzz run. Budgets are
    mostly short to fit the CI time: 46% tiny (4-8 tokens), 3% 101-200."""
    temperature = rng.choice([0.0, 1.5, rng.uniform(0.0, 1.5)])
    top_p = rng.choice([1.0, rng.uniform(0.5, 1.0)])
    r = rng.random()
    n = (rng.randint(4, 8) if r < 0.46 else rng.randint(9, 16) if r < 0.91
         else rng.randint(17, 100) if r < 0.97 else rng.randint(101, 200))
    return (temperature, top_p, n, rng.randrange(1 << 30), rng.choice(SMOL_SCHEMAS),
            rng.choice(SMOL_PROMPTS))


class SmolLM2JsonFuzzTest(unittest.TestCase):
    """The fuzz on a real vocabulary: at least 300 generations of SmolLM2-135M through
    the C accelerator (built by CI before the tests) over seeds, temperatures 0-1.5,
    top-p 0.5-1, budgets 4-200, prompts that ask for JSON and prompts that do not,
    with and without schemas, plus CLI runs whose stdout must be exactly the value
    and a newline. Without the model or the accelerator the test fails (the pure
    path would take hours); ~2 minutes on the 2-core CI machine."""

    THREADS = 2

    @classmethod
    def setUpClass(cls):
        if not os.path.exists(SMOLLM2):
            raise AssertionError("%s is missing: run python3 tools/get_model.py" % SMOLLM2)
        cls.model = picolm.Model(SMOLLM2, n_ctx=512, threads=cls.THREADS)
        cls.tmp = tempfile.TemporaryDirectory()
        if cls.model.accel is None:
            cls.tearDownClass()
            raise AssertionError("the SmolLM2 --json fuzz needs the C accelerator (%s): "
                                 "run python3 tools/build_accel.py" % cls.model.backend)

    @classmethod
    def tearDownClass(cls):
        cls.model.close()
        cls.tmp.cleanup()

    def check_value(self, text, schema, context):
        try:
            value = json.loads(text)
        except ValueError as e:
            self.fail("%s: %r does not parse: %s" % (context, text, e))
        if schema is None:
            self.assertIsInstance(value, dict, context)
        self.assertTrue(validate_top(schema, value), "%s: %r" % (context, text))

    def generate(self, settings):
        temperature, top_p, n, seed, schema, prompt = settings
        stats = {}
        # each prompt's KV entries come from a --cache file after its first run:
        # prefill would be a tenth of the test's time
        cache = os.path.join(self.tmp.name, "%d.kv" % SMOL_PROMPTS.index(prompt))
        with contextlib.redirect_stderr(io.StringIO()):     # "Skipping N cached..."
            text = "".join(self.model.generate(prompt, n, temperature, top_p, seed, stats,
                                               grammar=picolm.JsonGrammar(schema),
                                               cache=cache))
        return text, stats

    def test_fuzz(self):
        rng = random.Random(2026)
        runs = refused_budgets = tiny = long = 0
        while runs < 300 * FUZZ:
            settings = smol_run_settings(rng)
            temperature, top_p, n, seed, schema, prompt = settings
            context = "schema %r prompt %r -t %.2f -k %.2f -n %d -s %d" % (
                schema, prompt, temperature, top_p, n, seed)
            try:
                text, stats = self.generate(settings)
            except picolm.PicoError as e:     # the budget cannot hold the shortest value
                grammar = picolm.JsonGrammar(schema)
                self.assertGreater(grammar.completion_length(grammar.start), n, context)
                self.assertIn("--json needs", str(e))
                refused_budgets += 1
                continue
            self.check_value(text, schema, context)
            self.assertLessEqual(stats["generated_tokens"], n, context)
            runs += 1
            tiny += n <= 8
            long += n > 100
        self.assertGreater(tiny, 100)
        self.assertGreater(long, 4)
        self.assertGreater(refused_budgets, 0)

    def test_cli(self):
        """Through the real command line: stdout is the value and one newline, the same
        text as the same settings give in-process."""
        rng = random.Random(7)
        for run in range(6):
            settings = smol_run_settings(rng)
            temperature, top_p, n, seed, schema, prompt = settings
            grammar = picolm.JsonGrammar(schema)
            n = max(n, grammar.completion_length(grammar.start))
            settings = (temperature, top_p, n, seed, schema, prompt)
            args = [sys.executable, PICOLM, SMOLLM2, "-c", "512", "-j", str(self.THREADS),
                    "-n", str(n), "-t", repr(temperature), "-k", repr(top_p), "-s", str(seed),
                    "--json"]
            with tempfile.TemporaryDirectory() as tmp:
                if schema is not None:
                    path = os.path.join(tmp, "schema.json")
                    with open(path, "w") as f:
                        json.dump(schema, f)
                    args += ["--json-schema", path]
                r = subprocess.run(args, input=prompt.encode(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, timeout=300)
            context = "CLI run %d: %s" % (run, " ".join(args[3:]))
            self.assertEqual(r.returncode, 0, (context, r.stderr))
            out = r.stdout.decode("utf-8")
            self.assertTrue(out.endswith("\n"), (context, out))
            self.assertFalse(out[:-1].endswith((" ", "\t", "\n")), (context, out))
            self.check_value(out[:-1], schema, context)
            self.assertEqual(out, self.generate(settings)[0] + "\n", context)


class FakeTokenizer:
    """What JsonConstraint needs of a tokenizer, over a given vocabulary."""

    def __init__(self, vocab, eog_ids):
        self.vocab, self.n_vocab, self.eog_ids = vocab, len(vocab), eog_ids

    def token_bytes(self, token_id):
        return self.vocab[token_id]


class ConstraintSamplingTest(unittest.TestCase):

    def test_refusal_samples_among_the_allowed(self):
        """After a refused token, choose() draws what Sampler.sample(logits, allowed)
        draws, whether the mask comes as the allowed ids or (in a string, where most
        tokens are allowed) as the refused ones set to -inf."""
        rng = random.Random(11)
        words = sorted({"".join(rng.choice("abcdefgh é") for _ in range(rng.randint(1, 4)))
                        .encode() for _ in range(400)})
        vocab = ([b""] + [bytes((b,)) for b in range(32, 127)] + words
                 + [b'"', b'",', b'"}', b'{"', b'":', b'":"', b' {', b'\\n', b'\xc3'])
        tok = FakeTokenizer(vocab, {0})
        index = picolm.JsonTokenIndex(vocab)
        cases = [(picolm.JsonGrammar({"type": "object", "required": ["s"], "properties": {
                      "s": {"type": "string", "maxLength": 5}}}),
                  (b"", b"{", b'{"s":"', b'{"s":"ab', b'{"s":"abcde', b'{"s":"x"',
                   b'{"s":"x"}')),
                 # a number may end or go on: end of generation competes with digits
                 (picolm.JsonGrammar({"type": "number"}), (b"", b"1", b"-", b"12.5"))]
        paths = collections.Counter()
        # the greedy window, scaled down to this small vocabulary
        patch = unittest.mock.patch.object(picolm, "JSON_GREEDY_TRIES", 32)
        patch.start()
        self.addCleanup(patch.stop)
        for run in range(500):
            grammar, prefixes = rng.choice(cases)
            prefix = rng.choice(prefixes)
            state = grammar.advance(grammar.start, prefix)
            need = grammar.completion_length(state)
            budget = rng.choice([need, need + 1, need + 5, 100])
            logits = [rng.gauss(0.0, 3.0) for _ in vocab]
            logits[0] += rng.choice([0.0, 6.0, 20.0])   # often end of generation first
            temperature = rng.choice([0.0, 0.7, 1.5])
            top_p, seed = rng.choice([0.5, 0.9, 1.0]), rng.randrange(1 << 30)
            constraint = picolm.JsonConstraint(tok, grammar)
            constraint.state = state
            constraint.index = index
            got = constraint.choose(picolm.Sampler(temperature, top_p, seed), logits, budget)
            reference = picolm.Sampler(temperature, top_p, seed)
            first = reference.sample(logits)
            complete = grammar.is_complete(state)
            if (first == 0 and complete) or (first != 0 and index.try_token(
                    state, first, budget) is not None):
                expect = first
            else:
                allowed = index.allowed_tokens(state, budget) + ([0] if complete else [])
                expect = reference.sample(logits, allowed)
                if temperature == 0.0:      # found among the next-best tokens, or masked
                    ranked = sorted(range(len(vocab)), key=logits.__getitem__, reverse=True)
                    paths["greedy %s" % (ranked.index(expect) < picolm.JSON_GREEDY_TRIES)] += 1
                else:
                    paths["refused" if index.mask(state, budget)[1] else "allowed"] += 1
            self.assertEqual(got, expect, (run, prefix, budget, temperature, top_p))
            if got != 0:
                self.assertIsNotNone(grammar.advance(state, vocab[got]), (run, prefix))
        self.assertGreater(min(paths.values()), 10, paths)
        self.assertEqual(len(paths), 4, paths)


class JsonCliTest(TinyModelCase):

    def cli(self, *args, stdin="Give me JSON"):
        return subprocess.run([sys.executable, PICOLM, self.path, "-c", "256"] + list(args),
                              input=stdin.encode(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)

    def schema_file(self, schema, raw=None):
        path = os.path.join(self.tmp.name, "schema%d.json" % random.randrange(1 << 30))
        with open(path, "w") as f:
            f.write(raw if raw is not None else json.dumps(schema))
        return path

    def test_cli_runs(self):
        for args, schema in [(["--json", "-n", "8", "-t", "1.5", "-s", "3"], None),
                             (["--json", "-n", "60", "-t", "0"], None),
                             (["-n", "50", "-t", "1.0", "-k", "0.7"], SCHEMAS[1]),
                             (["-n", "30", "-t", "0.9", "-s", "9"], SCHEMAS[2])]:
            if schema is not None:
                args = args + ["--json-schema", self.schema_file(schema)]
            r = self.cli(*args)
            self.assertEqual(r.returncode, 0, r.stderr)
            out = r.stdout.decode("utf-8")
            self.assertTrue(out.endswith("\n") and not out.endswith("\n\n") or out == "\n")
            value = json.loads(out)
            self.assertTrue(validate_top(schema, value), out)

    def test_cli_errors(self):
        r = self.cli("--json", "-n", "1")
        self.assertEqual(r.returncode, 2)
        self.assertEqual(r.stdout, b"")
        self.assertIn(b"--json needs at least 2 tokens", r.stderr)
        path = self.schema_file({"type": "string", "pattern": "a+"})
        r = self.cli("--json-schema", path)
        self.assertEqual(r.returncode, 2)
        self.assertEqual(r.stdout, b"")
        self.assertTrue(r.stderr.decode().startswith(
            "picolm: error: %s: unsupported keyword 'pattern'" % path), r.stderr)
        self.assertEqual(r.stderr.count(b"\n"), 1)
        for bad in (self.schema_file(None, raw="{not json"),
                    os.path.join(self.tmp.name, "absent.json"),
                    self.schema_file({"type": "object", "required": 3})):
            r = self.cli("--json-schema", bad)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertEqual(r.stdout, b"")
            self.assertTrue(r.stderr.startswith(b"picolm: error: " + bad.encode() + b": "),
                            r.stderr)
            self.assertEqual(r.stderr.count(b"\n"), 1)


if __name__ == "__main__":
    unittest.main()
