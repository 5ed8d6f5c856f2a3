"""picolm.Model on random tiny llama models, against a plain reference forward pass
written here: same equations, float math, weights dequantized with picolm.dequantize
(itself checked against our own decoders of the blocks).

Run: python3 -m unittest tests.test_model_tiny -v
"""
import math
import operator
import os
import random
import shutil
import struct
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import picolm  # noqa: E402
import gguf_writer as gw  # noqa: E402

# Tolerances, relative to the largest logit. With F32/F16/BF16 weights picolm's products
# are exact float sums, so it must agree with the reference to rounding noise. Quantized
# products may round the activations (picolm's SWAR kernels do, to ~1e-7 of |row||x|,
# checked in test_matvec_accuracy); an error that small still flips the FP16 rounding of
# a few cached keys/values, which moves logits by up to ~2e-4 of the largest. A wrong
# epsilon, RoPE base or pairing, a layout mistake or a missing FP16 rounding of the cache
# moves them by 3e-4 (the FP16 rounding, seen by the exact types) to O(1).
EXACT_TYPES = ("F32", "F16", "BF16")
REL_TOL_EXACT = 1e-9
REL_TOL_QUANT = 1e-3
MATVEC_TOL = 1e-5  # of |row| * |x|: the bound of shared/reference/README.md
GGML_TOL = 5e-2  # models all Q4_1/Q8_0 compute as llama.cpp: activations rounded to 8 bits
TMP = None


def setUpModule():
    global TMP
    TMP = gw.fast_tmpdir("picolm-test-tiny-")


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


# Two shapes: blocks of 32 fit rows of 64; 256-element blocks need rows of 256 (matrices
# whose rows are shorter fall back to Q8_0, as llama.cpp's quantizer does).
SMALL = dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=300)
WIDE = dict(n_layer=2, n_embd=256, n_head=2, n_head_kv=1, head_dim=32, n_ff=64, n_vocab=260)
TYPES = [("F32", SMALL), ("F16", SMALL), ("BF16", SMALL), ("Q8_0", SMALL), ("Q4_0", SMALL),
         ("Q4_1", SMALL), ("Q5_0", SMALL), ("Q5_1", SMALL), ("IQ4_NL", SMALL),
         ("Q2_K", WIDE), ("Q3_K", WIDE), ("Q4_K", WIDE), ("Q5_K", WIDE), ("Q6_K", WIDE),
         ("IQ4_XS", WIDE)]
SEQUENCES = ([1, 75, 259, 250, 47, 258, 0], [2, 17, 17, 17, 140, 33])


def supported(name):
    return gw.GGML_TYPES[name] in picolm.QUANT_TYPES


def f16(v):
    """FP16 rounding as the cache stores it (out of range -> inf)."""
    try:
        return struct.unpack("<e", struct.pack("<e", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


# ---------------------------------------------------------------------------
# The reference

class Reference:
    """A plain llama forward pass over a GGUF file's weights."""

    def __init__(self, path):
        with picolm.GGUFFile(path) as f:
            md = f.metadata
            self.n_layer = md["llama.block_count"]
            self.n_embd = md["llama.embedding_length"]
            self.n_head = md["llama.attention.head_count"]
            self.n_head_kv = md["llama.attention.head_count_kv"]
            self.head_dim = md.get("llama.attention.key_length", self.n_embd // self.n_head)
            self.n_rot = md.get("llama.rope.dimension_count", self.head_dim)
            self.eps = md["llama.attention.layer_norm_rms_epsilon"]
            self.base = md["llama.rope.freq_base"]
            self.weights, self.types = {}, {}
            for name, t in f.tensors.items():
                n = t.n_cols * t.n_rows
                values = picolm.dequantize(t.type, t.data, n)
                self.types[name] = t.type
                if len(t.shape) == 1:
                    self.weights[name] = list(values)
                else:
                    self.weights[name] = [values[r * t.n_cols:(r + 1) * t.n_cols]
                                          for r in range(t.n_rows)]
        self.output = self.weights.get("output.weight", self.weights["token_embd.weight"])

    @staticmethod
    def matvec(rows, x):
        return [sum(map(operator.mul, row, x)) for row in rows]

    def rmsnorm(self, x, w):
        scale = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + self.eps)
        return [v * scale * g for v, g in zip(x, w)]

    def rope(self, vec, n_heads, pos):
        """NORM pairing: (2i, 2i+1) of each head rotated by pos * base^(-2i/n_rot)."""
        out = list(vec)
        angles = [pos * self.base ** (-2.0 * i / self.n_rot) for i in range(self.n_rot // 2)]
        for h in range(n_heads):
            o = h * self.head_dim
            for i, theta in enumerate(angles):
                c, s = math.cos(theta), math.sin(theta)
                a, b = vec[o + 2 * i], vec[o + 2 * i + 1]
                out[o + 2 * i] = a * c - b * s
                out[o + 2 * i + 1] = a * s + b * c
        return out

    def logits(self, ids):
        """Logits after each position of ids."""
        W, hd = self.weights, self.head_dim
        group = self.n_head // self.n_head_kv
        keys = [[] for _ in range(self.n_layer)]
        values = [[] for _ in range(self.n_layer)]
        result = []
        for pos, token in enumerate(ids):
            x = list(W["token_embd.weight"][token])
            for layer in range(self.n_layer):
                p = "blk.%d." % layer
                h = self.rmsnorm(x, W[p + "attn_norm.weight"])
                q = self.rope(self.matvec(W[p + "attn_q.weight"], h), self.n_head, pos)
                k = self.rope(self.matvec(W[p + "attn_k.weight"], h), self.n_head_kv, pos)
                v = self.matvec(W[p + "attn_v.weight"], h)
                keys[layer].append([f16(e) for e in k])
                values[layer].append([f16(e) for e in v])
                att = []
                for head in range(self.n_head):
                    qh = q[head * hd:(head + 1) * hd]
                    kv = (head // group) * hd
                    scores = [sum(map(operator.mul, qh, key[kv:kv + hd])) / math.sqrt(hd)
                              for key in keys[layer]]
                    top = max(scores)
                    weights = [math.exp(s - top) for s in scores]
                    total = sum(weights)
                    att += [sum(w * val[kv + d] for w, val in zip(weights, values[layer])) / total
                            for d in range(hd)]
                x = [a + b for a, b in zip(x, self.matvec(W[p + "attn_output.weight"], att))]
                h = self.rmsnorm(x, W[p + "ffn_norm.weight"])
                gate = self.matvec(W[p + "ffn_gate.weight"], h)
                up = self.matvec(W[p + "ffn_up.weight"], h)
                act = [g / (1.0 + math.exp(-g)) * u for g, u in zip(gate, up)]
                x = [a + b for a, b in zip(x, self.matvec(W[p + "ffn_down.weight"], act))]
            result.append(self.matvec(self.output, self.rmsnorm(x, W["output_norm.weight"])))
        return result


# ---------------------------------------------------------------------------

MODELS = {}


def tiny_model(name, **extra):
    """(TinyLlama, Reference) of the test model for one weight type, made once."""
    key = (name, tuple(sorted(extra.items())))
    if key not in MODELS:
        shape = dict(dict(TYPES)[name])
        shape.update(extra)
        index = [t for t, _ in TYPES].index(name)
        path = os.path.join(TMP, "tiny-%s-%d.gguf" % (name, len(MODELS)))
        tiny = gw.make_tiny_llama(path, name, seed=100 + index, tied=index % 2 == 0,
                                  output_type="F16" if index % 2 else None,
                                  norm_eps=1e-3, rope_base=500.0, **shape)
        MODELS[key] = (tiny, Reference(path))
    return MODELS[key]


class TestTinyModels(unittest.TestCase):
    """The pure Python path streaming its weights from the map, in float64: exact types
    agree with the reference to 1e-9."""
    accelerate, pack, arithmetic = False, "off", "llama.cpp"
    exact_tol, quant_tol, matvec_tol = REL_TOL_EXACT, REL_TOL_QUANT, MATVEC_TOL
    split_exact_tol, split_quant_tol = 1e-9, 1e-9  # a sequence in one call vs token by token

    def model(self, path, **kwargs):
        return picolm.Model(path, accelerate=self.accelerate, pack=self.pack,
                            arithmetic=self.arithmetic, **kwargs)

    def product(self, tensor, x):
        """The pure path's product of the whole tensor with x."""
        kind = picolm.PackedRows if self.pack == "on" else picolm.StreamedRows
        rows = kind(tensor, 0, tensor.n_rows)
        return rows(rows.prepare(x))


    def assertClose(self, got, want, what, tol):
        self.assertEqual(len(got), len(want), what)
        scale = max(map(abs, want))
        worst = max(abs(a - b) for a, b in zip(got, want))
        self.assertLessEqual(worst, tol * scale,
                             "%s: logits differ by %.3g (largest %.3g)" % (what, worst, scale))

    def test_types_available(self):
        """Every type of the quant section is exercised here (none silently left out)."""
        for name, _ in TYPES:
            self.assertTrue(supported(name), name)

    def test_dequantize_matches_our_decoder(self):
        for name, _ in TYPES:
            if not supported(name):
                continue
            tiny, ref = tiny_model(name)
            with self.subTest(type=name):
                for tensor, want in tiny.weights.items():
                    got = ref.weights[tensor]
                    if isinstance(got[0], list):
                        got = [v for row in got for v in row]
                    self.assertEqual(ref.types[tensor], gw.GGML_TYPES[tiny.types[tensor]])
                    worst = max(abs(a - b) for a, b in zip(got, want))
                    self.assertLessEqual(worst, 1e-6 * max(map(abs, want)), tensor)

    def test_matvec_accuracy(self):
        """The pure path's products on the models' matrices against exact float dot
        products."""
        rng = random.Random(2)
        for name, _ in TYPES:
            if not supported(name):
                continue
            tiny, ref = tiny_model(name)
            with self.subTest(type=name), picolm.GGUFFile(tiny.path) as f:
                for tensor_name in ("token_embd.weight", "blk.0.attn_q.weight",
                                    "blk.1.ffn_up.weight"):
                    t = f.tensors[tensor_name]
                    x = [rng.gauss(0.0, 1.0) for _ in range(t.n_cols)]
                    x[rng.randrange(t.n_cols)] = 40.0  # RMSNorm outputs have outliers
                    got = self.product(t, x)
                    norm_x = math.sqrt(sum(v * v for v in x))
                    for row, value in zip(ref.weights[tensor_name], got):
                        exact = math.fsum(map(operator.mul, row, x))
                        norm_row = math.sqrt(sum(v * v for v in row))
                        self.assertLessEqual(abs(value - exact),
                                             self.matvec_tol * norm_row * norm_x, tensor_name)

    def test_logits_match_reference(self):
        """Every position of two sequences, evaluated token by token and in one call, and
        in two calls after reset(): within tolerance of the reference; split == whole."""
        for name, _ in TYPES:
            if not supported(name):
                continue
            tiny, ref = tiny_model(name)
            tol = self.exact_tol if name in EXACT_TYPES else self.quant_tol
            with self.subTest(type=name), self.model(tiny.path, n_ctx=32) as model:
                wants = {}
                for seq in SEQUENCES:
                    want = wants[tuple(seq)] = ref.logits(seq)
                    model.reset()
                    for pos, token in enumerate(seq):
                        step = model.eval([token])
                        self.assertClose(step, want[pos], "%s position %d" % (name, pos), tol)
                    model.reset()
                    whole = model.eval(seq)
                    self.assertClose(whole, step, "%s: split vs whole" % name,
                                     self.split_exact_tol if name in EXACT_TYPES
                                     else self.split_quant_tol)
                    self.assertEqual(len(model.tokens), len(seq))
                seq = SEQUENCES[0]
                model.reset()
                model.eval(seq[:3])
                rest = model.eval(seq[3:])
                self.assertEqual(len(model.tokens), len(seq))
                self.assertClose(rest, wants[tuple(seq)][-1], "%s: 3 + rest" % name, tol)

    def test_two_processes_give_the_same_logits(self):
        names = [n for n in ("Q8_0", "Q4_K", "Q6_K") if supported(n)]
        for name in names:
            tiny, ref = tiny_model(name)
            seq = SEQUENCES[0]
            with self.model(tiny.path, n_ctx=16) as one:
                want = one.eval(seq)
            with self.subTest(type=name), self.model(tiny.path, n_ctx=16, threads=2) as two:
                got = two.eval(seq[:4])
                got = two.eval(seq[4:])
                self.assertEqual(got, want)
                two.reset()
                self.assertEqual(two.eval(seq), want)

    def test_eval_greedy_is_the_argmax(self):
        tiny, _ = tiny_model("Q8_0")
        seq = SEQUENCES[0]
        with self.model(tiny.path, n_ctx=16) as model:
            logits = model.eval(seq[:4])
            want = [max(range(len(logits)), key=logits.__getitem__)]
            logits = model.eval(seq[4:5])
            want.append(max(range(len(logits)), key=logits.__getitem__))
            model.reset()
            self.assertEqual([model.eval_greedy(seq[:4]), model.eval_greedy(seq[4:5])], want)
            self.assertEqual(model.tokens, seq[:5])

    def test_context_limit(self):
        tiny, _ = tiny_model("Q8_0")
        with self.model(tiny.path, n_ctx=4) as model:
            model.eval([1, 2, 3])
            with self.assertRaises(ValueError):
                model.eval([4, 5])
            model.reset()
            self.assertEqual(len(model.eval([1, 2, 3, 4])), 300)  # SMALL: 300 tokens
            with self.assertRaises(ValueError):
                model.eval([300])

    def test_multi_head_attention_and_untied_output(self):
        """n_head_kv == n_head (no grouping), default epsilon and base, untied output."""
        path = os.path.join(TMP, "mha.gguf")
        gw.make_tiny_llama(path, "Q8_0", n_layer=1, n_embd=64, n_head=2, n_head_kv=2,
                           n_ff=96, n_vocab=290, seed=9, tied=False, rope_base=10000.0)
        ref = Reference(path)
        with self.model(path) as model:
            seq = [5, 6, 7, 8]
            # all Q8_0: llama.cpp's arithmetic (8-bit activations) unless asked otherwise
            self.assertEqual(model.ggml, self.arithmetic == "llama.cpp")
            self.assertClose(model.eval(seq), ref.logits(seq)[-1], "mha",
                             GGML_TOL if model.ggml else self.quant_tol)


class TestTinyModelsPacked(TestTinyModels):
    """The pure path with its weights packed into big-integer columns (--pack on):
    weights rounded to 16 bits of their row's largest, x to 24 bits of its L1 norm,
    products within 1e-4 of |row| * |x| (the issue's bound; about 5e-6 in practice),
    so every type is held to the quantized types' logit tolerance."""
    pack = "on"
    exact_tol, quant_tol, matvec_tol = REL_TOL_QUANT, REL_TOL_QUANT, 1e-4


class TestTinyModelsExactArithmetic(TestTinyModels):
    """--arithmetic exact: float64 for every model, all-Q8_0 included, packed; the
    accelerator, asked for, is not used (it has only llama.cpp's arithmetic)."""
    accelerate, pack, arithmetic = True, "on", "exact"
    exact_tol, quant_tol, matvec_tol = REL_TOL_QUANT, REL_TOL_QUANT, 1e-4

    def model(self, path, **kwargs):
        model = super().model(path, **kwargs)
        self.assertIsNone(model.accel)
        self.assertIn("exact arithmetic", model.backend)
        return model


@unittest.skipUnless(picolm.load_accelerator()[0] is not None,
                     "no C accelerator here: %s" % picolm.load_accelerator()[1])
class TestTinyModelsAccelerated(TestTinyModels):
    """The C accelerator computes as llama.cpp does: the query and the attention weights
    rounded to FP16 (FP16 noise, ~5e-4, even on exact types), Q4_1 and Q8_0 activations
    rounded to 8 bits, the other quantized types' to 16 bits. A batch of tokens attends in
    another summation order than a single token (llama.cpp's two orders), so one call and
    token by token differ by that rounding, amplified by the 8-bit roundings downstream."""
    accelerate = True
    exact_tol, quant_tol = 1e-3, 5e-2
    split_exact_tol, split_quant_tol = 1e-5, 5e-2


if __name__ == "__main__":
    unittest.main()
