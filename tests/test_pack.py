"""Packed weights (--pack): big-integer columns against ggml and against exact sums.

PackedRows must match every quant-zoo type's <type>.y to 1e-4 of |row| * |x| (the
bound of the reference README), including the cases that could break a fixed-width
lane: outliers in x, all-zero rows, rows whose block scales differ by 2**20, and rows
and x built to drive every lane to its largest possible value. `--pack auto` must
stream on a small board. Model-level checks are in test_model_tiny (TestTinyModelsPacked).
"""

import math
import os
import random
import shutil
import struct
import subprocess
import sys
import unittest
from array import array
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import picolm  # noqa: E402
import gguf_writer as gw  # noqa: E402
from test_quants import ZOO, ZOO_TYPES, f32_values, norm  # noqa: E402

TOL = 1e-4  # of |row| * |x|


def tensor_of(type_name, n_cols, data):
    """A picolm.Tensor over bytes in memory: whole rows of n_cols weights."""
    type_id = gw.GGML_TYPES[type_name]
    n_rows = len(data) // picolm.row_bytes(type_id, n_cols)
    t = picolm.Tensor("w", type_id, [n_cols, n_rows], 0, len(data))
    t.data = memoryview(data)
    return t


def packed_product(tensor, x, start=0, end=None):
    rows = picolm.PackedRows(tensor, start, tensor.n_rows if end is None else end)
    return rows(rows.prepare(x))


class PackedTest(unittest.TestCase):
    def assert_close(self, got, rows, x, what, tol=TOL):
        self.assertEqual(len(got), len(rows), what)
        nx = norm(x)
        for r, (value, row) in enumerate(zip(got, rows)):
            exact = math.fsum(w * v for w, v in zip(row, x))
            self.assertLessEqual(abs(value - exact), tol * norm(row) * nx,
                                 "%s row %d: %r vs %r" % (what, r, value, exact))


class ZooTest(PackedTest):
    @classmethod
    def setUpClass(cls):
        cls.zoo = picolm.GGUFFile(ZOO)
        cls.x = f32_values(cls.zoo.tensors["x"])

    @classmethod
    def tearDownClass(cls):
        cls.zoo.close()

    def test_every_type_matches_ggml(self):
        """<type>.y is ggml's own dequantized matrix times x, in float64."""
        nx = norm(self.x)
        for name in ZOO_TYPES:
            with self.subTest(type=name):
                q = self.zoo.tensors[name + ".q"]
                expect = f32_values(self.zoo.tensors[name + ".expect"])
                y_ref = f32_values(self.zoo.tensors[name + ".y"])
                K = q.n_cols
                got = packed_product(q, self.x)
                for r, (value, want) in enumerate(zip(got, y_ref)):
                    bound = TOL * norm(expect[r * K:(r + 1) * K]) * nx
                    self.assertLessEqual(abs(value - want), bound, "%s row %d" % (name, r))

    def test_row_ranges_and_chunks(self):
        """Shares of rows, and columns split over several lane integers, give the
        same numbers as the whole matrix in one integer."""
        q = self.zoo.tensors["Q4_K.q"]
        whole = packed_product(q, self.x)
        with mock.patch.object(picolm, "PACK_ROWS", 5):
            self.assertEqual(packed_product(q, self.x, 3, 17), whole[3:17])
            self.assertEqual(packed_product(q, self.x), whole)

    def test_zero_x(self):
        q = self.zoo.tensors["Q4_1.q"]
        self.assertEqual(packed_product(q, [0.0] * q.n_cols), [0.0] * q.n_rows)

    def test_non_finite_x_takes_the_streamed_path(self):
        q = self.zoo.tensors["Q8_0.q"]
        for bad in (math.inf, -math.inf, math.nan):
            x = list(self.x)
            x[3] = bad
            streamed = picolm.StreamedRows(q, 0, q.n_rows)
            want = streamed(streamed.prepare(x))
            got = packed_product(q, x)
            self.assertEqual([repr(v) for v in got], [repr(v) for v in want])

    def test_memory_estimate(self):
        """packed_bytes, which --pack auto relies on, is what the columns take."""
        q = self.zoo.tensors["Q4_0.q"]
        rows = picolm.PackedRows(q, 0, q.n_rows)
        taken = sum(sys.getsizeof(c) + 8 for cols, _, _ in rows.chunks for c in cols)
        self.assertLess(abs(picolm.packed_bytes(q) - taken), 0.1 * taken)


class WorstCaseTest(PackedTest):
    def setUp(self):
        self.rng = random.Random(5)

    def gauss(self, n):
        return [self.rng.gauss(0.0, 1.0) for _ in range(n)]

    def test_outliers_in_x(self):
        data, values = gw.random_tensor("Q4_1", 8 * 256, self.rng)
        t = tensor_of("Q4_1", 256, data)
        rows = [values[r * 256:(r + 1) * 256] for r in range(8)]
        for outlier in (1e3, 1e6, -1e9):
            x = self.gauss(256)
            x[17] = outlier
            self.assert_close(packed_product(t, x), rows, x, "outlier %g" % outlier)

    def test_all_zero_rows(self):
        values = self.gauss(6 * 64)
        values[64:128] = [0.0] * 64
        values[320:] = [0.0] * 64
        t = tensor_of("F32", 64, array("f", values).tobytes())
        rows = [array("f", values[r * 64:(r + 1) * 64]).tolist() for r in range(6)]
        x = self.gauss(64)
        got = packed_product(t, x)
        self.assertEqual((got[1], got[5]), (0.0, 0.0))
        self.assert_close(got, rows, x, "zero rows")

    def test_block_scales_differing_by_2_20(self):
        """A row of Q8_0 blocks whose scales are 1 and 2**-20 (an fp16 subnormal), and
        Q4_1 blocks likewise, with x large where the weights are small."""
        blocks = []
        for b in range(8):
            d = 1.0 if b % 2 == 0 else 2.0 ** -20
            q = [self.rng.randint(-127, 127) for _ in range(32)]
            blocks.append(struct.pack("<e32b", d, *q))
        data = b"".join(blocks)
        q41 = b"".join(struct.pack("<ee", d, -8 * d) + bytes(self.rng.getrandbits(8)
                                                             for _ in range(16))
                       for d in (1.0, 2.0 ** -20) * 4)
        plain = self.gauss(256)
        boosted = list(plain)
        for b in range(1, 8, 2):
            boosted[32 * b:32 * (b + 1)] = [v * 2.0 ** 20 for v in plain[32 * b:32 * (b + 1)]]
        for x in (plain, boosted):
            for name, raw in (("Q8_0", data), ("Q4_1", q41)):
                rows = [picolm.dequantize(gw.GGML_TYPES[name], raw, 256)]
                self.assert_close(packed_product(tensor_of(name, 256, raw), x), rows, x, name)

    def test_lanes_at_their_largest(self):
        """Every weight at its row's largest magnitude and x of one size: each lane
        reaches 2**15 * sum|X|, the bound s is chosen for, with either sign."""
        K = 4096
        plus = [1.0] * K
        alternating = [(-1.0) ** c for c in range(K)]
        values = plus + [-v for v in plus] + alternating
        t = tensor_of("F32", K, array("f", values).tobytes())
        rows = [values[r * K:(r + 1) * K] for r in range(3)]
        for x in (plus, [-v for v in plus], alternating):
            got = packed_product(t, x)
            self.assert_close(got, rows, x, "largest lanes")
            self.assertEqual([round(v) for v in got], [round(math.fsum(
                w * v for w, v in zip(row, x))) for row in rows])

    def test_non_finite_weights_are_streamed(self):
        values = self.gauss(2 * 32)
        values[40] = math.inf
        t = tensor_of("F32", 32, array("f", values).tobytes())
        rows = picolm.PackedRows(t, 0, 2)
        self.assertIsNone(rows.chunks)
        x = self.gauss(32)
        streamed = picolm.StreamedRows(t, 0, 2)
        self.assertEqual(rows(rows.prepare(x)), streamed(streamed.prepare(x)))


class AttentionTest(unittest.TestCase):
    """PackedAttention against the streamed attention() over the same FP16 cache."""

    def setUp(self):
        self.rng = random.Random(11)
        self.kv = picolm.KVCache(2, 40, 2 * 16)       # 2 layers, 2 kv heads of 16
        self.att = picolm.PackedAttention(2, 4, 2, 16)  # 4 query heads

    def fill(self, layer, pos, spread=1.0):
        self.kv.store(layer, pos, [self.rng.gauss(0, spread) for _ in range(32)],
                      [self.rng.gauss(0, spread) for _ in range(32)])

    def check(self, layer, pos, q):
        got = self.att.step(self.kv, layer, pos, q)
        want = picolm.attention(q, self.kv, layer, pos + 1, 4, 2, 16)
        norm_v = max(map(abs, self.kv.rows(layer, 1, pos + 1)))
        for a, b in zip(got, want):
            self.assertLessEqual(abs(a - b), 1e-4 * norm_v, (layer, pos))

    def test_positions_one_by_one_and_rewound(self):
        for pos in range(30):
            # rows of very different sizes, as real keys have
            self.fill(0, pos, spread=10.0 ** self.rng.uniform(-3, 3))
            self.check(0, pos, [self.rng.gauss(0, 3) for _ in range(64)])
        # a rewind (generation restarted at position 12 with other tokens)
        for pos in range(12, 20):
            self.fill(0, pos)
            self.check(0, pos, [self.rng.gauss(0, 3) for _ in range(64)])

    def test_positions_taken_from_the_cache(self):
        """After a cache file was loaded: positions 0..9 are only in the FP16 cache."""
        for pos in range(10):
            self.fill(1, pos)
        self.att.clear()
        self.check(1, 9, [self.rng.gauss(0, 1) for _ in range(64)])

    def test_non_finite_entries_are_left_to_attention(self):
        self.fill(0, 0)
        self.kv.store(0, 1, [math.inf] * 32, [0.0] * 32)
        self.assertIsNone(self.att.step(self.kv, 0, 1, [1.0] * 64))
        self.att.clear()
        self.fill(0, 1)
        self.assertIsNone(self.att.step(self.kv, 0, 1, [math.nan] * 64))


# SmolLM2-135M's matrices: 30 layers of q, k, v, o, gate, up, down, and the tied output.
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536),
                  (1536, 576)] * 30 + [(576, 49152)]


class ChoiceTest(unittest.TestCase):
    tensors = [picolm.Tensor("w", picolm.GGML_Q4_1, list(shape), 0, 0)
               for shape in SMOLLM2_SHAPES]

    def choose(self, mode, available):
        with mock.patch.object(picolm, "available_memory", return_value=available):
            return picolm.choose_packing(mode, self.tensors)

    def test_auto_streams_on_a_small_board(self):
        packed, line = self.choose("auto", 256 * picolm.MB)
        self.assertFalse(packed)
        self.assertIn("streamed from the map", line)
        self.assertIn("over half of the 256 MB available", line)

    def test_auto_packs_with_room(self):
        packed, line = self.choose("auto", 24 * 1024 * picolm.MB)
        self.assertTrue(packed)
        size = float(line.split("RAM, ")[1].split(" MB")[0])
        self.assertTrue(600 < size < 800, line)  # 5.3 bytes for each of 134M weights

    def test_auto_streams_when_memory_is_unknown(self):
        self.assertFalse(self.choose("auto", None)[0])

    def test_on_and_off(self):
        self.assertTrue(self.choose("on", 256 * picolm.MB)[0])
        self.assertFalse(self.choose("off", 24 * 1024 * picolm.MB)[0])


class CliTest(unittest.TestCase):
    def test_pack_modes_say_what_they_do(self):
        tmp = gw.fast_tmpdir("picolm-test-pack-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        path = os.path.join(tmp, "tiny.gguf")
        gw.make_tiny_llama(path, "Q4_0")
        for mode, said in (("on", "weights packed into RAM"),
                           ("off", "weights streamed from the map (--pack off)")):
            run = subprocess.run([sys.executable, os.path.join(ROOT, "picolm.py"), path,
                                  "--no-accel", "--pack", mode, "-n", "3", "-t", "0",
                                  "-p", "hi"], capture_output=True, text=True, timeout=120)
            self.assertEqual(run.returncode, 0, run.stderr)
            self.assertIn(said, run.stderr)
        run = subprocess.run([sys.executable, os.path.join(ROOT, "picolm.py"), path,
                              "--pack", "sometimes"], capture_output=True, text=True)
        self.assertEqual(run.returncode, 2)
        self.assertIn("invalid choice", run.stderr)


if __name__ == "__main__":
    unittest.main()
