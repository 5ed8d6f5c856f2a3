"""The pure path's llama.cpp arithmetic (models whose matrices are all Q4_1 or Q8_0): its
logits equal the C accelerator's bit for bit, which equal llama.cpp's (tests/test_accel.py
and tests/test_real_models.py hold the accelerator to llama.cpp's own numbers).

Tiny random models, evaluated as a prompt at once and then token by token (llama.cpp
attends in another order within a batch), streamed and packed, in one and two processes.
glibc's sinf/cosf, which the RoPE table repeats, is compared with libm itself.

Run: python3 -m unittest tests.test_ggml -v
"""
import array
import ctypes
import ctypes.util
import math
import operator
import os
import random
import shutil
import struct
import sys
import unittest
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import picolm  # noqa: E402
import gguf_writer as gw  # noqa: E402

TMP = None
SEQUENCE = [1, 75, 259, 250, 47, 258, 0, 33, 17]
PROMPT = 5  # tokens of SEQUENCE evaluated at once, the rest one by one
# (name, make_tiny_llama arguments): Q4_1 layers with a tied Q8_0 embedding, as
# SmolLM2-135M-Instruct.Q4_1 has them (head_dim 16: K.q is all tail beyond ggml's
# 32-element steps); Q8_0 layers with an untied Q4_1 output (head_dim 64: two steps).
MODELS = [
    ("q4_1-tied-q8_0", dict(quant_type="Q4_1", embd_type="Q8_0", tied=True, n_embd=64,
                            n_head=4, n_head_kv=2, n_ff=128, seed=5)),
    ("q8_0-untied-q4_1", dict(quant_type="Q8_0", output_type="Q4_1", tied=False, n_embd=128,
                              n_head=2, n_head_kv=1, n_ff=96, seed=6)),
]


def setUpModule():
    global TMP
    TMP = gw.fast_tmpdir("picolm-test-ggml-")


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def model_path(name, **args):
    path = os.path.join(TMP, name + ".gguf")
    if not os.path.exists(path):
        gw.make_tiny_llama(path, n_layer=2, n_vocab=300, norm_eps=1e-3, rope_base=500.0,
                           **args)
    return path


def run(path, **kwargs):
    """The logits after the prompt, then after each further token."""
    with picolm.Model(path, n_ctx=32, **kwargs) as model:
        out = [model.eval(SEQUENCE[:PROMPT])]
        out += [model.eval([token]) for token in SEQUENCE[PROMPT:]]
        return model.ggml, out


def f32(value):
    return array.array("f", [value])[0]


def q8_form(q, d):
    """What the products see of the Q8X made of (q, d): q, and d and s = d * sum(q) in FP16
    (q8_from_intervals settles d's float32 bits only as far as those)."""
    qx = picolm.Q8X.from_blocks(list(q), list(d))
    return (list(q), list(qx.d), list(qx.s)) if qx.finite else "not finite"


class TestTinyModels(unittest.TestCase):

    def test_logits_equal_the_accelerators(self):
        accel = picolm.load_accelerator()[0]
        if accel is None:
            self.skipTest("no C accelerator here: %s" % picolm.load_accelerator()[1])
        for name, args in MODELS:
            path = model_path(name, **args)
            ggml, want = run(path, accelerate=True)
            self.assertTrue(ggml, name)
            for pack in ("off", "on"):
                for threads in (1, 2):
                    with self.subTest(model=name, pack=pack, threads=threads):
                        ggml, got = run(path, accelerate=False, pack=pack, threads=threads)
                        self.assertTrue(ggml)
                        for i, (a, b) in enumerate(zip(got, want)):
                            self.assertEqual(a, b, "%s: logits %d differ by up to %g" % (
                                name, i, max(abs(u - v) for u, v in zip(a, b))))

    def test_batch_and_single_tokens_attend_in_other_orders(self):
        """Within a batch, attention sums in tinyBLAS's order, for a single token in
        ggml_vec_dot_f16's, as llama.cpp does: the last bits differ. (On the tiny models
        the 8-bit rounding downstream hides that; on SmolLM2 it moves logits by 0.25.)"""
        rng = random.Random(4)
        n_pos, head_dim = 40, 64
        kv = picolm.KVCache(1, n_pos, head_dim)
        for pos in range(n_pos):
            kv.store(0, pos, [rng.gauss(0, 2) for _ in range(head_dim)],
                     [rng.gauss(0, 1) for _ in range(head_dim)])
        q = [f32(rng.gauss(0, 2)) for _ in range(2 * head_dim)]
        batched, single = (picolm.attention_ggml(q, kv, 0, n_pos, 2, 1, head_dim, b)
                           for b in (True, False))
        kv.close()
        self.assertTrue(batched != single, "the two orders agree to the last bit")
        self.assertLess(max(abs(a - b) for a, b in zip(batched, single)), 1e-5)

    def test_attention_by_head_ranges(self):
        """-j N processes attend with a share of the query heads each (SmolLM2: 9 heads
        on 3 key/value heads, split 4 + 5): the shares, joined, are the whole, for every
        split point, in llama.cpp's arithmetic (both orders) and exact."""
        rng = random.Random(5)
        n_pos, head_dim, n_head, n_head_kv = 11, 16, 9, 3
        kv = picolm.KVCache(1, n_pos, n_head_kv * head_dim)
        for pos in range(n_pos):
            kv.store(0, pos, [rng.gauss(0, 2) for _ in range(n_head_kv * head_dim)],
                     [rng.gauss(0, 1) for _ in range(n_head_kv * head_dim)])
        q = [f32(rng.gauss(0, 2)) for _ in range(n_head * head_dim)]
        for ggml in (True, False):
            for batched in (True, False):
                attention = picolm.Attention(kv, n_head, n_head_kv, head_dim, ggml)
                whole = attention(q, 0, n_pos, batched)
                self.assertEqual(len(whole), n_head * head_dim)
                for split in range(n_head + 1):
                    with self.subTest(ggml=ggml, batched=batched, split=split):
                        self.assertEqual(attention(q, 0, n_pos, batched, range(split))
                                         + attention(q, 0, n_pos, batched,
                                                     range(split, n_head)), whole)
        kv.close()

    def test_which_tokens_attend_as_a_batch(self):
        """As pk_forward: every token of a call with several ids is part of llama.cpp's
        batch, except a last one alone in a new micro-batch of 512 (and a call's only
        token)."""
        name, args = MODELS[0]
        path = model_path("long-context", **dict(args, n_ctx_train=1024))
        with picolm.Model(path, n_ctx=1024, accelerate=False) as model:
            flags = []
            model.forward = lambda token, pos, want="logits", batched=False: (
                flags.append(batched) or [0.0])
            for n in (1, 2, 513, 512):
                del flags[:]
                model.reset()
                model.eval([1] * n)
                lone = n % picolm.LLAMA_UBATCH == 1
                self.assertEqual(flags, [True] * (n - 1) + [not lone], n)

    def test_greedy_equals_the_largest_logit(self):
        """eval_greedy, which skips the float32 chains of output rows that cannot be the
        largest, picks what the argmax of eval's logits picks, in one and two processes."""
        for name, args in MODELS:
            path = model_path(name, **args)
            for pack in ("off", "on"):
                for threads in (1, 2):
                    with self.subTest(model=name, pack=pack, threads=threads):
                        with picolm.Model(path, n_ctx=32, accelerate=False, pack=pack,
                                          threads=threads) as model:
                            for n in (1, PROMPT, len(SEQUENCE)):
                                model.reset()
                                logits = model.eval(SEQUENCE[:n])
                                model.reset()
                                self.assertEqual(model.eval_greedy(SEQUENCE[:n]),
                                                 picolm.first_largest(0, logits)[0])

    def test_argmax_of_rows(self):
        """GgmlRows.argmax: the first of the largest products, bit for bit as __call__
        computes it, for x with outliers, near-ties (rows one weight apart) and exact ties
        (equal rows), in rows of several chunks."""
        rng = random.Random(9)
        n_cols, n_rows = 96, 2 * picolm.GGML_ROWS + 40
        for type_name in ("Q4_1", "Q8_0"):
            block_bytes = gw.BLOCKS[type_name][1]
            row_bytes = n_cols // 32 * block_bytes
            data = bytearray(gw.random_tensor(gw.type_id(type_name), n_cols * n_rows, rng)[0])
            star = data[5 * row_bytes:6 * row_bytes]
            data[2100 * row_bytes:2101 * row_bytes] = star  # an exact tie, further on
            nudged = bytearray(star)
            nudged[-1] ^= 1  # one weight apart
            data[700 * row_bytes:701 * row_bytes] = nudged
            data[2101 * row_bytes:2102 * row_bytes] = nudged
            tensor = SimpleNamespace(type=gw.type_id(type_name), n_cols=n_cols,
                                     n_rows=n_rows, data=memoryview(bytes(data)))
            star_values = gw.dequantize(type_name, bytes(star), n_cols)
            xs = [star_values,  # rows 5 and 700 (each with a copy) the largest two
                  [rng.gauss(0, 1) for _ in range(n_cols)],
                  [rng.gauss(0, 1) * (300 if i == 7 else 1) for i in range(n_cols)],
                  [0.0] * n_cols]
            for packed in (False, True):
                rows = picolm.GgmlRows(tensor, 0, n_rows, packed)
                part = picolm.GgmlRows(tensor, 1000, n_rows, packed)
                for i, x in enumerate(xs):
                    with self.subTest(type=type_name, packed=packed, x=i):
                        qx = picolm.Q8X(picolm._f32(x))
                        want = picolm.first_largest(0, rows(qx))
                        self.assertEqual(rows.argmax(qx), want)
                        self.assertEqual(part.argmax(qx), picolm.first_largest(1000, part(qx)))
                        if i == 0:
                            self.assertIn(want[0], (5, 700))
                none = picolm.GgmlRows(tensor, 9, 9, packed)  # a worker's empty share
                self.assertEqual(none.argmax(picolm.Q8X(picolm._f32(xs[1]))), (9, -math.inf))

    def test_memory_estimate(self):
        """GgmlRows.packed_bytes, which --pack auto relies on, is what the packed rows take
        (less malloc's overhead, which it counts too)."""
        name, args = MODELS[0]
        with picolm.GGUFFile(model_path(name, **args)) as f:
            for tensor in (f.tensors["token_embd.weight"], f.tensors["blk.0.ffn_up.weight"]):
                rows = picolm.GgmlRows(tensor, 0, tensor.n_rows, True)
                taken = sum(sum(sys.getsizeof(c) + 8 for c in cols) + len(dw) * dw.itemsize
                            + (len(mw) * mw.itemsize if mw is not None else 0)
                            for cols, dw, mw in rows.chunks)
                estimate = picolm.GgmlRows.packed_bytes(tensor)
                self.assertGreaterEqual(estimate, taken)
                self.assertLess(estimate, 1.25 * taken)

    def test_other_types_keep_exact_arithmetic(self):
        """A model with one matrix of another type (here an F16 output) takes the exact
        float64 path."""
        path = model_path("q4_1-f16-output", quant_type="Q4_1", output_type="F16",
                          tied=False, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=7)
        with picolm.Model(path, n_ctx=8, accelerate=False) as model:
            self.assertFalse(model.ggml)
            self.assertIsInstance(model.rope, picolm.RopeTable)
            self.assertNotIsInstance(model.rope, picolm.RopeGgml)


class TestGatedQ8(unittest.TestCase):
    """gated_q8, SwiGLU's output for ffn_down computed from bounds on gate and up and few
    of their float32 chains, against Q8X(swiglu_ggml(gate.x, up.x)) computed in full."""

    N_COLS, N_ROWS = 96, picolm.GGML_ROWS + 64  # two chunks of rows

    @classmethod
    def setUpClass(cls):
        rng = random.Random(11)
        q4_1 = gw.type_id("Q4_1")

        def matrix(name):
            data = gw.random_tensor(q4_1, cls.N_COLS * cls.N_ROWS, rng, scale=0.5)[0]
            return SimpleNamespace(name=name, type=q4_1, n_cols=cls.N_COLS,
                                   n_rows=cls.N_ROWS, data=memoryview(data))
        cls.gate, cls.up = matrix("gate"), matrix("up")
        n = cls.N_COLS
        cls.xs = [[rng.gauss(0, 1) for _ in range(n)],
                  [rng.gauss(0, 1e-3) * (400 if i % 41 == 3 else 1) for i in range(n)],
                  [rng.gauss(0, 30) for _ in range(n)],  # gate products past expf's range
                  [0.0] * 32 + [rng.gauss(0, 1) for _ in range(n - 32)],
                  [0.0] * n]

    def full(self, qx, gate, up):
        """(q, d) of every row, every float32 chain computed."""
        rows = [picolm.GgmlRows(t, 0, t.n_rows, packed=True) for t in (gate, up)]
        blocks = picolm.q8_blocks(picolm.swiglu_ggml(*(r(qx) for r in rows)))
        return blocks or picolm._not_finite_blocks(gate.n_rows)

    def gated(self, qx, start, end, gate=None, up=None):
        """gated_q8 over rows start..end-1, and how many rows each exact pass computed."""
        passes = []
        kernels = [picolm.GgmlBoundRows(t, start, end) for t in (gate or self.gate,
                                                                  up or self.up)]

        def counted(exact):
            def count(qx, picks):  # gate's and up's rows
                passes.append(len(picks) // 2)
                return exact(qx, picks)
            return count
        kernels[0].exact = counted(kernels[0].exact)
        return picolm.gated_q8(*kernels, qx), passes

    def test_equals_the_full_computation(self):
        computed = []
        for i, x in enumerate(self.xs):
            qx = picolm.Q8X(picolm._f32(x))
            want_q, want_d = self.full(qx, self.gate, self.up)
            for start, end in ((0, self.N_ROWS), (0, 32 * 17), (32 * 17, self.N_ROWS)):
                with self.subTest(x=i, rows=(start, end)):
                    (q, d), passes = self.gated(qx, start, end)
                    self.assertEqual(q, want_q[start:end])
                    self.assertEqual(list(d), list(want_d[start // 32:end // 32]))
                    computed.append(passes)
        # the bounds left few rows open, and some after amax was known (rounding edges)
        candidates, edges = zip(*computed)
        self.assertLess(sum(candidates) + sum(edges), 0.2 * 3 * len(self.xs) * self.N_ROWS)
        self.assertGreater(sum(edges), 0)

    def test_not_finite_input(self):
        x = [1.0] * self.N_COLS
        x[40] = math.nan  # not first in its block: max() would pass over it
        self.assertFalse(picolm.Q8X(x).finite)
        x[40] = math.inf
        qx = picolm.Q8X(picolm._f32(x))
        self.assertFalse(qx.finite)
        (q, d), passes = self.gated(qx, 0, 64)
        self.assertFalse(picolm.Q8X.from_blocks(q, d).finite)
        self.assertEqual(passes, [])

    def test_rows_that_cannot_be_bounded(self):
        """A block with a negative d (no Q4_1 quantizer makes one) leaves its chunk
        unbounded: every row of it is computed, with the same result."""
        data = bytearray(self.gate.data)
        struct.pack_into("<e", data, 20 * 3, -0.01)  # row 0, block 0: 3 blocks a row
        gate = SimpleNamespace(**dict(vars(self.gate), data=memoryview(bytes(data))))
        qx = picolm.Q8X(picolm._f32(self.xs[0]))
        (q, d), passes = self.gated(qx, 0, 64, gate=gate)
        want_q, want_d = self.full(qx, gate, self.up)
        self.assertEqual((q, list(d)), (want_q[:64], list(want_d[:2])))
        self.assertEqual(passes, [64])

    def test_bounds_hold(self):
        """|ggml's float32 product - E| <= B for every row, and B is not vacuous."""
        for i, x in enumerate(self.xs[:4]):
            qx = picolm.Q8X(picolm._f32(x))
            for tensor in (self.gate, self.up):
                with self.subTest(x=i, matrix=tensor.name):
                    exact = picolm.GgmlRows(tensor, 0, tensor.n_rows, packed=True)(qx)
                    rows = picolm.GgmlBoundRows(tensor, 0, tensor.n_rows)
                    estimates, bounds = rows.bounds(picolm.BoundX(qx))
                    for value, e, b in zip(exact, estimates, bounds):
                        self.assertLessEqual(abs(value - e), b)
                    self.assertLess(max(bounds), 1e-3 * max(map(abs, exact)))

    def test_swiglu_error(self):
        """swiglu_ggml is within SWIGLU_ERROR / 2 of g * sigmoid(g) * u, relative, over
        arguments up to gated_q8's limit of 64 (200,000 of them)."""
        rng = random.Random(3)
        n = 200000
        g = picolm._f32([rng.uniform(-64, 64) if i % 2 else rng.gauss(0, 3) for i in range(n)])
        u = picolm._f32([rng.gauss(0, 2) for _ in range(n)])
        worst = 0.0
        for a, b, h in zip(g, u, picolm.swiglu_ggml(g, u)):
            exact = a / (1.0 + math.exp(-a)) * b
            if abs(exact) > 2.0 ** -100:
                worst = max(worst, abs(h - exact) / abs(exact))
        self.assertLess(worst, picolm.SWIGLU_ERROR / 2)

    def test_memory_estimate(self):
        """GgmlBoundRows.packed_bytes, which --pack auto relies on, covers what the rows
        take."""
        rows = picolm.GgmlBoundRows(self.gate, 0, self.N_ROWS)
        taken = sum(sum(map(sys.getsizeof, chunk[0] + chunk[1] + chunk[2]))
                    + sum(sum(map(sys.getsizeof, per_row)) for per_row in chunk[3:])
                    for chunk in rows.chunks)
        estimate = picolm.GgmlBoundRows.packed_bytes(self.gate)
        self.assertGreaterEqual(estimate, taken)
        self.assertLess(estimate, 1.25 * taken)



class TestQ8FromIntervals(unittest.TestCase):
    """q8_from_intervals against q8_blocks, for values known within intervals of every
    width: none (each block settled by its intervals), narrow (most settled), wide (each
    block's amax computed, and values at rounding edges)."""

    def test_equals_q8_blocks(self):
        rng = random.Random(7)
        x = picolm._f32([rng.gauss(0, 1) * (1e3 if i % 97 == 5 else 1) for i in range(32 * 40)]
                        + [0.0] * 32 + [rng.gauss(0, 1e-30) for _ in range(32)])
        want = q8_form(*picolm.q8_blocks(x))
        largest = {max(range(b, b + 32), key=lambda i: abs(x[i])) for b in range(0, len(x), 32)}
        computed = {}
        for width in (0.0, 1e-7, 1e-5, 1e-3, 0.1, "amax"):
            # "amax": only each block's largest value is uncertain (1e-4), hence 127/amax
            spread = [((1e-4 if i in largest else 0.0) if width == "amax" else width) * abs(v)
                      for i, v in enumerate(x)]
            lo, hi = list(map(operator.sub, x, spread)), list(map(operator.add, x, spread))
            calls = []

            def exact(offsets):
                calls.append(len(offsets))
                return [x[i] for i in offsets]
            with self.subTest(width=width):
                self.assertEqual(q8_form(*picolm.q8_from_intervals(lo, hi, exact)), want)
            computed[width] = calls
        self.assertEqual(computed[0.0], [32, 0])  # only the block of zeros (amax 0)
        self.assertLess(sum(computed[1e-7]), 4 * 32)
        self.assertGreater(computed[0.1][1], 0)  # values straddling rounding edges
        self.assertGreater(computed["amax"][0], 32)  # blocks opened for 127/amax alone

    def test_not_finite(self):
        x = [1.0] * 64
        lo, hi = list(x), list(x)
        lo[40], hi[40] = -math.inf, math.inf
        self.assertIsNone(picolm.q8_from_intervals(
            lo, hi, lambda offsets: [math.inf if i == 40 else x[i] for i in offsets]))


class TestAttentionQ8(unittest.TestCase):
    """attention_q8, attention's output for attn_output computed from bounds on V.w and few
    of its float32 chains, against q8_blocks(attention_ggml(...)) computed in full."""

    N_HEAD, N_HEAD_KV = 6, 2

    def cache(self, n_pos, head_dim, seed, value_scale=1.0):
        rng = random.Random(seed)
        kv_dim = self.N_HEAD_KV * head_dim
        kv = picolm.KVCache(1, n_pos, kv_dim)
        for pos in range(n_pos):
            kv.store(0, pos, [rng.gauss(0, 2) for _ in range(kv_dim)],
                     [rng.gauss(0, value_scale) for _ in range(kv_dim)])
        self.addCleanup(kv.close)
        return kv, [f32(rng.gauss(0, 2)) for _ in range(self.N_HEAD * head_dim)]

    def full(self, q, kv, n_pos, head_dim, batched, heads=None):
        out = picolm.attention_ggml(q, kv, 0, n_pos, self.N_HEAD, self.N_HEAD_KV, head_dim,
                                    batched, heads)
        return q8_form(*(picolm.q8_blocks(out) or picolm._not_finite_blocks(len(out))))

    def bounded(self, q, kv, n_pos, head_dim, batched, packed, heads=None, opened=None):
        """attention_q8's (q, d), as lists; opened, if a list, gets how many dimensions
        each exact pass computed."""
        if opened is not None:
            original = picolm._weighted_values

            def counted(value_rows, weights, hd, lanes):
                opened.append(hd)
                return original(value_rows, weights, hd, lanes)
            picolm._weighted_values = counted
            self.addCleanup(setattr, picolm, "_weighted_values", original)
        q8, d = picolm.attention_q8(q, kv, 0, n_pos, self.N_HEAD, self.N_HEAD_KV, head_dim,
                                    batched, packed, heads)
        if opened is not None:
            picolm._weighted_values = original
        return q8, list(d)

    def test_equals_the_full_computation(self):
        opened, dims = [], 0
        for head_dim in (32, 64):
            for n_pos in (1, 9, 40, 100):
                kv, q = self.cache(n_pos, head_dim, seed=n_pos + head_dim)
                packed = picolm.PackedValues(1, self.N_HEAD_KV, head_dim)
                for batched in (False, True):
                    want = self.full(q, kv, n_pos, head_dim, batched)
                    for split in (0, 2, 3, self.N_HEAD):  # a -j 2 split of the query heads
                        with self.subTest(head_dim=head_dim, n_pos=n_pos, batched=batched,
                                          split=split):
                            first = self.bounded(q, kv, n_pos, head_dim, batched, packed,
                                                 range(split), opened)
                            second = self.bounded(q, kv, n_pos, head_dim, batched, packed,
                                                  range(split, self.N_HEAD), opened)
                            self.assertEqual(q8_form(first[0] + second[0],
                                                     first[1] + second[1]), want)
                            dims += self.N_HEAD * head_dim
        # most blocks settled by the bounds alone: fewer dimensions computed than blocks
        self.assertLess(sum(opened), dims / 32)

    def test_stale_rows_are_not_used(self):
        """The packed rows follow the cache: values overwritten (a reset, a loaded cache)
        and fewer positions than were packed."""
        head_dim, n_pos = 64, 30
        kv, q = self.cache(n_pos, head_dim, seed=1)
        packed = picolm.PackedValues(1, self.N_HEAD_KV, head_dim)
        self.bounded(q, kv, n_pos, head_dim, False, packed)
        rng = random.Random(2)
        kv_dim = self.N_HEAD_KV * head_dim
        for pos in range(12, n_pos):
            kv.store(0, pos, [rng.gauss(0, 2) for _ in range(kv_dim)],
                     [rng.gauss(0, 3) for _ in range(kv_dim)])
        for positions in (n_pos, 12, 20):
            with self.subTest(n_pos=positions):
                self.assertEqual(q8_form(*self.bounded(q, kv, positions, head_dim, False,
                                                       packed)),
                                 self.full(q, kv, positions, head_dim, False))
                values = kv.rows(0, 1, positions)
                for kv_head in range(self.N_HEAD_KV):  # maxima hold for the new values
                    for i, most in enumerate(packed.maxima[0][kv_head]):
                        self.assertGreaterEqual(most, max(abs(v) for v in values[
                            kv_head * head_dim + i::kv_dim]))

    def test_not_finite_values(self):
        """An inf in a value row makes that key/value head's output not finite, as
        attention_ggml's; the other head is still bounded."""
        head_dim, n_pos = 32, 10
        kv, q = self.cache(n_pos, head_dim, seed=3)
        row = list(kv.row(0, 1, 4))
        row[head_dim + 5] = math.inf  # key/value head 1
        kv.store(0, 4, kv.row(0, 0, 4), row)
        packed = picolm.PackedValues(1, self.N_HEAD_KV, head_dim)
        full = picolm.attention_ggml(q, kv, 0, n_pos, self.N_HEAD, self.N_HEAD_KV, head_dim,
                                     False)
        q8, d = self.bounded(q, kv, n_pos, head_dim, False, packed)
        self.assertFalse(picolm.Q8X.from_blocks(q8, d).finite)
        self.assertFalse(picolm.Q8X(full).finite)
        half = self.N_HEAD // 2 * head_dim  # the heads of key/value head 0
        self.assertEqual(q8_form(q8[:half], d[:half // 32]),
                         q8_form(*picolm.q8_blocks(full[:half])))
        self.assertTrue(all(map(math.isnan, d[half // 32:])))

    def test_bounds_hold(self):
        """The float32 V.w of every dimension lies within value_sum_intervals, which are
        narrow beside q's rounding steps."""
        head_dim, kv_dim = 64, self.N_HEAD_KV * 64
        for n_pos, scale in ((7, 1.0), (70, 1e-3), (300, 1e3)):
            kv, q = self.cache(n_pos, head_dim, seed=n_pos, value_scale=scale)
            values = kv.rows(0, 1, n_pos)
            rows, maxima = picolm.PackedValues(1, self.N_HEAD_KV, head_dim).head_rows(
                kv, 0, 1, head_dim, n_pos)
            self.assertEqual(maxima, [max(abs(values[head_dim + i + p * kv_dim])
                                          for p in range(n_pos)) for i in range(head_dim)])
            for lanes in (8, 32):
                weights = picolm.halves(picolm._f32(
                    [random.Random(lanes).random() / n_pos for _ in range(n_pos)]))
                got = picolm._head_output(values, kv_dim, 1, head_dim, weights, lanes,
                                          range(head_dim))
                lo, hi = picolm.value_sum_intervals(rows, weights, maxima, lanes)
                with self.subTest(n_pos=n_pos, lanes=lanes):
                    for value, a, b in zip(got, lo, hi):
                        self.assertLessEqual(a, value)
                        self.assertLessEqual(value, b)
                    # under a tenth of the 8-bit step, amax/127
                    self.assertLess(max(b - a for a, b in zip(lo, hi)),
                                    0.1 * max(map(abs, got)) / 127)

    def test_memory_estimate(self):
        """PackedValues.bytes_per_position, which --pack auto relies on, covers what the
        rows take."""
        head_dim, n_pos = 64, 50
        kv, q = self.cache(n_pos, head_dim, seed=4)
        packed = picolm.PackedValues(1, self.N_HEAD_KV, head_dim)
        self.bounded(q, kv, n_pos, head_dim, False, packed)
        taken = (sum(sys.getsizeof(row) + 8 for rows in packed.rows[0] for row in rows)
                 + len(packed.seen[0]))
        estimate = n_pos * picolm.PackedValues.bytes_per_position(1, self.N_HEAD_KV, head_dim)
        self.assertGreaterEqual(estimate, taken)
        self.assertLess(estimate, 1.25 * taken)

def load_glibc_libm():
    """glibc's libm with sinf and cosf declared, or None where the C library is another."""
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # glibc's own function
        libm = ctypes.CDLL(ctypes.util.find_library("m"))
    except (OSError, AttributeError, TypeError):
        return None
    for fn in ("sinf", "cosf"):
        getattr(libm, fn).restype = ctypes.c_float
        getattr(libm, fn).argtypes = [ctypes.c_float]
    return libm


class TestGlibcSinCos(unittest.TestCase):
    """sincosf_glibc against glibc's own sinf and cosf (which ggml's RoPE table calls)."""

    def setUp(self):
        self.libm = load_glibc_libm()
        if self.libm is None:
            self.skipTest("the C library is not glibc")

    def check(self, values):
        bad = [y for y in values
               if picolm.sincosf_glibc(y) != (self.libm.sinf(y), self.libm.cosf(y))]
        self.assertEqual(bad[:5], [], "%d of %d differ" % (len(bad), len(values)))

    def test_rope_angles(self):
        """Every angle of positions 0..2047 for bases 10000 and 100000 (SmolLM2), 64 dims:
        about 1 in 40 of them is not the correctly rounded sin or cos."""
        for base in (10000.0, 100000.0):
            scale = f32(math.pow(base, f32(-2.0 / 64)))
            values = []
            for pos in range(0, 2048):
                theta = f32(pos)
                for _ in range(32):
                    values.append(theta)
                    theta = f32(theta * scale)
            self.check(values)

    def test_every_branch(self):
        """Tiny (< 2^-12), small (< pi/4), medium (< 120) and large arguments, both signs."""
        rng = random.Random(3)
        values = [f32(rng.choice((-1, 1)) * 10.0 ** rng.uniform(-6, 6)) for _ in range(20000)]
        values += [0.0, -0.0, 2.0 ** -12, f32(math.pi / 4), 120.0, -120.0, 1e30, -3e38]
        self.check(values)


if __name__ == "__main__":
    unittest.main()
