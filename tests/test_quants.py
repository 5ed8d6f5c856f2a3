"""Quantized blocks against ggml itself (tests/data/quant-zoo.gguf).

For every type in the zoo: dequantize must give ggml's float32 values bit for
bit, and matvec must match <type>.y (expect . x, in float64) to 1e-5 of
|row| * |x|.  Reference tensors are read with array('f') so that nothing
under test is used to read the expected values.
"""

import math
import os
import sys
import unittest
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import picolm  # noqa: E402
from picolm import QUANT_TYPES, dequantize, matvec, prepare_x  # noqa: E402

ZOO = os.path.join(ROOT, "tests", "data", "quant-zoo.gguf")
ZOO_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K",
             "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]

# ggml type id: (name, weights per block, bytes per block), from ggml.h and
# ggml-common.h.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    20: ("IQ4_NL", 32, 18), 23: ("IQ4_XS", 256, 136), 30: ("BF16", 1, 2),
}
REL_TOL = 1e-5


def f32_values(tensor):
    a = array("f")
    a.frombytes(bytes(tensor.data))
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def f32_bits(values):
    return array("f", values).tobytes()


def norm(v):
    return math.sqrt(math.fsum(e * e for e in v))


class QuantZooTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.zoo = picolm.GGUFFile(ZOO)
        cls.x = f32_values(cls.zoo.tensors["x"])
        cls.x_norm = norm(cls.x)

    @classmethod
    def tearDownClass(cls):
        cls.zoo.close()

    def assert_matvec_close(self, y, ref, rows, what):
        self.assertEqual(len(y), len(ref), what)
        for r, (got, want) in enumerate(zip(y, ref)):
            bound = REL_TOL * norm(rows[r]) * self.x_norm
            self.assertLessEqual(abs(got - want), bound,
                                 "%s row %d: %r vs %r" % (what, r, got, want))

    def test_type_table(self):
        self.assertEqual(
            {t: (q.name, q.block_size, q.block_bytes)
             for t, q in QUANT_TYPES.items() if t in GGML_TYPES},
            GGML_TYPES)

    def test_row_bytes(self):
        self.assertEqual(picolm.row_bytes(3, 576), 18 * 20)
        self.assertEqual(picolm.row_bytes(14, 1536), 6 * 210)
        self.assertEqual(picolm.row_bytes(0, 7), 28)

    def check_type(self, name, q, expect, y_ref):
        n_rows, n_cols = q.n_rows, q.n_cols
        self.assertEqual(QUANT_TYPES[q.type].name, name)
        rows = [expect[r * n_cols:(r + 1) * n_cols] for r in range(n_rows)]

        # Whole tensor, then row by row as the embedding lookup does.
        got = dequantize(q.type, q.data, n_rows * n_cols)
        self.assertEqual(f32_bits(got), f32_bits(expect), "%s dequantize" % name)
        rb = picolm.row_bytes(q.type, n_cols)
        for r in (0, 7, n_rows - 1):
            got = dequantize(q.type, q.data[r * rb:(r + 1) * rb], n_cols)
            self.assertEqual(f32_bits(got), f32_bits(rows[r]),
                             "%s dequantize row %d" % (name, r))

        px = prepare_x(q.type, self.x)
        y = matvec(q.type, q.data, n_cols, 0, n_rows, px)
        self.assertTrue(all(type(v) is float for v in y))
        self.assert_matvec_close(y, y_ref, rows, "%s matvec" % name)
        # A row range, with the prepared x reused.
        y = matvec(q.type, q.data, n_cols, 5, 18, px)
        self.assert_matvec_close(y, y_ref[5:18], rows[5:18],
                                 "%s matvec rows 5..17" % name)

    def test_zoo_types(self):
        t = self.zoo.tensors
        for name in ZOO_TYPES:
            with self.subTest(type=name):
                self.check_type(name, t[name + ".q"],
                                f32_values(t[name + ".expect"]),
                                f32_values(t[name + ".y"]))

    def test_f32(self):
        src = self.zoo.tensors["source"]
        values = f32_values(src)
        rows = [values[r * src.n_cols:(r + 1) * src.n_cols]
                for r in range(src.n_rows)]
        y_ref = [math.fsum(w * v for w, v in zip(row, self.x)) for row in rows]
        self.check_type("F32", src, values, y_ref)

    def test_zero_x(self):
        q = self.zoo.tensors["Q4_1.q"]
        zeros = [0.0] * q.n_cols
        y = matvec(q.type, q.data, q.n_cols, 0, q.n_rows, prepare_x(q.type, zeros))
        self.assertEqual(y, [0.0] * q.n_rows)


if __name__ == "__main__":
    unittest.main()
