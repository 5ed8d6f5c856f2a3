"""Tests of the optional C accelerator (picolm_kernels).

Every kernel is checked against ggml's own numbers in tests/data/quant-zoo.gguf:
dequantization bit for bit, the float-activation dot within 1e-5 of |row|*|x|, the dot
with quantized activations within its stated bound (see qa_bound), and for Q4_1 and Q8_0
(8-bit activations) bit for bit against ggml's arithmetic written out here (ggml_dot_q8).
The library is built if a compiler exists (the native build, plus the --portable and the
plain-C builds into a temporary folder so the fallbacks are tested too); the tests skip,
saying so, only when there is no compiler. Where a cross compiler and qemu are installed,
the aarch64 and armv7 NEON builds run the same zoo checks under emulation (TestCrossBuilds,
through tests/cross_harness.c).
The model tests (greedy tokens and perplexity against llama.cpp) skip when the model file
is absent (tools/get_model.py fetches it).
"""
import array
import atexit
import ctypes
import fractions
import json
import math
import mmap
import os
import shutil
import struct
import subprocess
import sys
import pathlib
import random
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import picolm_kernels as pk  # noqa: E402
import build_accel  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
ZOO = os.path.join(DATA, "quant-zoo.gguf")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
REFERENCE = os.path.join(DATA, "smollm2-135m-instruct-q4_1.llamacpp.json")
NLL_REFERENCE = os.path.join(DATA, "smollm2-135m-instruct-q4_1.nll.json")
ZOO_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
             "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


# ----------------------------------------------------------------------------
# Reading GGUF: picolm.GGUFFile when it reads the file, else a few lines of our own

BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22),
          7: (32, 24), 8: (32, 34), 20: (32, 18), 10: (256, 84), 11: (256, 110),
          12: (256, 144), 13: (256, 176), 14: (256, 210), 23: (256, 136)}


def read_gguf(path):
    """(file bytes, {name: (absolute offset, type, shape, nbytes)}, metadata)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        import picolm
        with picolm.GGUFFile(path) as gf:
            table = {name: (gf.data_start + t.offset, t.type, tuple(t.shape), t.nbytes)
                     for name, t in gf.tensors.items()}
            return data, table, dict(gf.metadata)
    except Exception:  # picolm absent or mid-edit: parse it here
        pass
    return (data,) + _parse_gguf(data)


def _parse_gguf(buf):
    pos = [4]

    def take(fmt):
        v = struct.unpack_from("<" + fmt, buf, pos[0])
        pos[0] += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        n = take("Q")
        s = buf[pos[0]:pos[0] + n].decode("utf-8", "replace")
        pos[0] += n
        return s

    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
               11: "q", 12: "d"}

    def value(t):
        if t in scalars:
            return take(scalars[t])
        if t == 8:
            return string()
        et, n = take("I"), take("Q")
        return [value(et) for _ in range(n)]

    take("I")
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, dims, take("I"), take("Q")))
    align = meta.get("general.alignment", 32)
    start = -pos[0] % align + pos[0]
    table = {}
    for name, dims, t, off in infos:
        n = 1
        for d in dims:
            n *= d
        bs, bb = BLOCKS[t]
        table[name] = (start + off, t, dims, n // bs * bb)
    return table, meta


# ----------------------------------------------------------------------------
# The libraries under test

_variants = {}


def variant(kind):
    """The library of one build kind: "native", "portable" or "plain" (PK_NO_SIMD)."""
    if kind in _variants:
        return _variants[kind]
    if build_accel.find_compiler() is None:
        raise unittest.SkipTest("no C compiler found ($CC, cc, gcc, clang): the accelerator cannot be built")
    if kind == "native":
        lib = pk.load()
        if lib is None:
            path = build_accel.build(quiet=True)
            assert path, "the native build failed"
            lib = pk.load(path)
        assert lib is not None, pk.reason
    else:
        folder = tempfile.mkdtemp(prefix="picolm-accel-")
        atexit.register(shutil.rmtree, folder, True)
        out = os.path.join(folder, "pk-%s.so" % kind)
        path = build_accel.build(quiet=True, portable=True, output=out,
                                 cflags="-DPK_NO_SIMD" if kind == "plain" else None)
        assert path, "the %s build failed" % kind
        lib = pk.load(path)
        assert lib is not None, pk.reason
    _variants[kind] = lib
    return lib


KINDS = ["native", "portable", "plain"]


_zoo = {}


def load_zoo():
    """The quant zoo: floats(name), raw(name) and the tensor table (read once)."""
    if _zoo:
        return _zoo
    data, table, _ = read_gguf(ZOO)

    def floats(name):
        off, t, shape, nbytes = table[name]
        assert t == 0
        return array.array("f", data[off:off + nbytes])

    def raw(name):
        off, t, shape, nbytes = table[name]
        return data[off:off + nbytes], t, shape

    _zoo.update({"floats": floats, "raw": raw, "table": table})
    return _zoo


def approx_equal(actual, expected, rel=1e-6, abs_tol=1e-12):
    """pytest.approx's test: equal, or within max(rel * |expected|, abs_tol)."""
    if actual == expected:
        return True
    return abs(actual - expected) <= max(rel * abs(expected), abs_tol)


def norm(v):
    return math.sqrt(math.fsum(float(a) * a for a in v))


# ----------------------------------------------------------------------------
# Kernels against the quant zoo

def qa_bound(row, x, bits=16):
    """The bound of the quantized-activation dot product's error for one row.

    16 bits: x is quantized per block b of 32 values to integers with scale
    d_b = amax_b / 32767, rounding to nearest, so each value moves by at most d_b / 2; the
    dot then moves by at most sum_b d_b / 2 * sum_{i in b} |w_i| (plus float rounding,
    ~1e-6 of |row||x|). That is at most sqrt(32) / 65534 = 8.6e-5 of |row|*|x|.
    8 bits (ggml's Q8 blocks): d_b = amax_b / 127 stored as FP16 (relative error 2^-11,
    times |q| <= 127), so a value moves by at most d_b * (1/2 + 127 * 2^-11) < 0.57 d_b.
    """
    levels, share = (32767.0, 0.5) if bits == 16 else (127.0, 0.57)
    total = 0.0
    for b in range(0, len(x), 32):
        amax = max(abs(v) for v in x[b:b + 32])
        total += amax / levels * share * math.fsum(abs(w) for w in row[b:b + 32])
    return total * 1.0001 + 2e-6 * norm(row) * norm(x)


def f32(v):
    """v rounded to float32 (one rounding of an exact double result is float32's own)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def f16(v):
    return struct.unpack("e", struct.pack("e", v))[0]


def fma32(a, b, c):
    """Float32 fused multiply-add: a*b + c exactly, rounded once to nearest even."""
    exact = fractions.Fraction(a) * fractions.Fraction(b) + fractions.Fraction(c)
    if exact == 0:
        return 0.0
    m = abs(exact)
    e = m.numerator.bit_length() - m.denominator.bit_length()
    if fractions.Fraction(2) ** e > m:
        e -= 1
    q = max(e, -126) - 23  # the unit in the last place of the result
    scaled = m / fractions.Fraction(2) ** q
    return math.copysign(math.ldexp(round(scaled), q), exact)  # round(): half to even


def ggml_dot_q8(ggml_type, row_bytes, x):
    """ggml's AVX2 vec_dot_q4_1_q8_1 / vec_dot_q8_0_q8_0 of one row with x, written out:
    x as Q8 blocks (d = amax/127, q = round(x * (127/amax)), d and s = d*sum(q) as FP16);
    per block 8 integer lanes of 4 products, each fused-multiply-added with scale d_w*d_x
    into its float accumulator; the accumulators summed pairwise; Q4_1's m*s terms fused
    into their own sum, added last."""
    acc, ms = [0.0] * 8, 0.0
    bb = 20 if ggml_type == 3 else 34
    for b in range(len(x) // 32):
        xs = x[32 * b:32 * b + 32]
        amax = max(abs(v) for v in xs)
        d = f32(amax / 127.0)
        inv = f32(127.0 / amax) if amax else 0.0
        q = [round(f32(v * inv)) for v in xs]
        blk = row_bytes[b * bb:(b + 1) * bb]
        if ggml_type == 3:
            dw, mw = struct.unpack_from("<ee", blk)
            w = [v & 15 for v in blk[4:20]] + [v >> 4 for v in blk[4:20]]
            ms = fma32(mw, f16(f32(d * sum(q))), ms)
        else:
            dw = struct.unpack_from("<e", blk)[0]
            w = list(struct.unpack_from("<32b", blk, 2))
        dd = f32(dw * f16(d))
        for k in range(8):
            lane = sum(w[4 * k + j] * q[4 * k + j] for j in range(4))
            acc[k] = fma32(dd, float(lane), acc[k])
    pair = [f32(acc[i] + acc[i + 4]) for i in range(4)]
    return f32(f32(f32(pair[0] + pair[2]) + f32(pair[1] + pair[3])) + ms)
class TestCrossBuilds(unittest.TestCase):
    """The NEON builds (aarch64; armv7 with -mfpu=neon) and build_accel.py's cross builds,
    where a cross compiler and qemu's user-mode emulator are installed: the kernels,
    driven by tests/cross_harness.c under the emulator, hold to the quant zoo as the
    native build does (dequantization bit for bit, float activations within 1e-5 of
    |row|*|x|, 16-bit activations within qa_bound, Q4_1 and Q8_0 with 8-bit activations
    bit for bit ggml's arithmetic)."""

    TARGETS = [("aarch64", "aarch64-linux-gnu-gcc", "qemu-aarch64"),
               ("armv7", "arm-linux-gnueabihf-gcc", "qemu-arm")]

    @classmethod
    def setUpClass(cls):
        cls.zoo = load_zoo()
        cls.folder = tempfile.mkdtemp(prefix="picolm-cross-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, ignore_errors=True)

    def tools(self, name, cc, emulator):
        if not (shutil.which(cc) and shutil.which(emulator)):
            self.skipTest("%s or %s is not installed" % (cc, emulator))
        return [cc], [emulator]

    def test_build_accel_cross_builds(self):
        """`build_accel.py --cc aarch64-linux-gnu-gcc` (armv7's flags come from the same
        isa_flags that the harness build below uses)."""
        name, cc, emulator = self.TARGETS[0]
        self.tools(name, cc, emulator)
        out = os.path.join(self.folder, "pk-%s.so" % name)
        self.assertEqual(build_accel.build(quiet=True, cc=cc, output=out), out)
        with open(out, "rb") as f:
            self.assertIn(b"PK-ISA:neon\0", f.read())

    def run_harness(self, name, cc, emulator, requests):
        """The answers of the harness built for the target to the requests (bytes)."""
        compiler, runner = self.tools(name, cc, emulator)
        system, arch = build_accel.target_of(compiler)
        flags, isa = build_accel.isa_flags(arch, False, False)
        exe = os.path.join(self.folder, "harness-%s" % name)
        base = [f for f in build_accel.BASE_FLAGS if f not in ("-shared", "-fPIC")]
        subprocess.run(compiler + base + flags + ["-static", '-DPK_SOURCE_HASH="cross"', "-o",
                                                  exe, os.path.join(ROOT, "tests",
                                                                    "cross_harness.c")]
                       + build_accel.LIBS, check=True, capture_output=True, timeout=600)
        result = subprocess.run(runner + [exe], input=requests, capture_output=True,
                                timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout[:16].rstrip(b"\0").decode(), isa)
        return result.stdout[16:]

    def test_neon_kernels_against_the_zoo(self):
        zoo = self.zoo
        x = zoo["floats"]("x")
        n, xn = len(x), norm(x)
        cases = []  # (type name, kind of request, its answer's length)
        requests = bytearray()
        for name in ZOO_TYPES:
            data, t, shape = zoo["raw"](name + ".q")
            rows = shape[1]
            requests += struct.pack("<iiqq", 1, t, n * rows, len(data)) + data
            cases.append((name, "dequantize", n * rows))
            for quantize in (0, 1):
                requests += (struct.pack("<iiiqqq", 2, t, quantize, n, rows, len(data)) + data
                             + x.tobytes())
                cases.append((name, "matvec quantized" if quantize else "matvec", rows))
        for target in self.TARGETS:
            with self.subTest(target=target[0]):
                answers = memoryview(self.run_harness(*target, bytes(requests))).cast("f")
                at = 0
                for name, kind, count in cases:
                    got, at = answers[at:at + count], at + count
                    data, t, shape = zoo["raw"](name + ".q")
                    expect, y = zoo["floats"](name + ".expect"), zoo["floats"](name + ".y")
                    if kind == "dequantize":
                        self.assertEqual(got.tobytes(), expect.tobytes(), name)
                        continue
                    bits = variant("plain").pk_type_has_qa(t) if kind != "matvec" else 0
                    if bits == 8:
                        rb = len(data) // count
                        want = [ggml_dot_q8(t, data[r * rb:(r + 1) * rb], x) for r in range(count)]
                        self.assertEqual(list(got), want, name)
                        continue
                    for r in range(count):
                        row = expect[r * n:(r + 1) * n]
                        bound = qa_bound(row, x, bits) if bits else 1e-5 * norm(row) * xn
                        self.assertLessEqual(abs(got[r] - y[r]), bound, "%s %s row %d"
                                             % (name, kind, r))
                self.assertEqual(at, len(answers))


# ----------------------------------------------------------------------------
# The forward pass against llama.cpp

def model_or_skip():
    if not os.path.exists(MODEL):
        raise unittest.SkipTest("model %s absent (python3 tools/get_model.py fetches it)" % MODEL)
    return MODEL


class Hparams:
    def __init__(self, meta, table):
        a = meta["general.architecture"]
        self.n_layer = meta[a + ".block_count"]
        self.n_embd = meta[a + ".embedding_length"]
        self.n_ff = meta[a + ".feed_forward_length"]
        self.n_head = meta[a + ".attention.head_count"]
        self.n_head_kv = meta.get(a + ".attention.head_count_kv", self.n_head)
        self.head_dim = meta.get(a + ".attention.key_length", self.n_embd // self.n_head)
        self.rope_dim = meta.get(a + ".rope.dimension_count", self.head_dim)
        self.rope_base = float(meta.get(a + ".rope.freq_base", 10000.0))
        self.rope_scale = 1.0
        self.rope_pairing = "norm"
        self.norm_eps = float(meta.get(a + ".attention.layer_norm_rms_epsilon", 1e-5))
        self.n_vocab = table["token_embd.weight"][2][1]


def kv_buffer(cfg, n_ctx):
    nbytes = 2 * cfg.n_layer * n_ctx * cfg.n_head_kv * cfg.head_dim * 2
    return mmap.mmap(-1, nbytes)


_models = {}


def accel_model(threads, n_ctx=640, max_batch=64, kind="native"):
    key = (threads, n_ctx, max_batch, kind)
    if key not in _models:
        lib = variant(kind)
        path = model_or_skip()
        _, table, meta = read_gguf(path)
        cfg = Hparams(meta, table)
        tensors = {k: v[:3] for k, v in table.items()}
        kv = kv_buffer(cfg, n_ctx)
        model = pk.AcceleratedModel(lib, path, cfg, tensors, n_ctx, kv, threads=threads,
                                    max_batch=max_batch)
        _models[key] = (model, kv, cfg, table)
    return _models[key]


def reference():
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)


def nll_reference():
    with open(NLL_REFERENCE, encoding="utf-8") as f:
        return json.load(f)


def neg_log_likelihood(logits, token):
    """-log softmax(logits)[token], in float64."""
    top = max(logits)
    return top + math.log(math.fsum(math.exp(v - top) for v in logits)) - logits[token]


def greedy(model, prompt_ids, n):
    logits = model.forward(prompt_ids, 0, want_logits=True)
    out, pos = [], len(prompt_ids)
    for i in range(n):
        token = max(range(len(logits)), key=logits.__getitem__)
        out.append(token)
        assert model.argmax() == token
        if i % 2:
            assert model.forward_argmax([token], pos) == model.argmax()
            logits = model.logits_array()
        else:
            logits = model.forward([token], pos)
        pos += 1
    return out


def _rows(shape):
    n = 1
    for d in shape[1:]:
        n *= d
    return n


# ----------------------------------------------------------------------------
# The tests

class TestBuildAndLoader(unittest.TestCase):
    """The build, the loader and its refusals."""

    def test_loader_identifies_library(self):
        lib = variant("native")
        assert lib.pk_source_hash().decode() == pk.source_hash()
        isa = lib.pk_isa().decode()
        assert isa in ("avx2", "sse2", "neon", "scalar")
        flags = pk.cpu_flags() or set()
        if pk.host_arch() == "x86_64" and {"avx2", "fma", "f16c"} <= flags:
            assert isa == "avx2"
        assert pk._peek(pk.library_path(), b"PK-ISA:") == isa
        assert pk._peek(pk.library_path(), b"PK-HASH:") == pk.source_hash()
        assert variant("portable").pk_isa().decode() in ("sse2", "neon", "scalar")
        assert variant("plain").pk_isa().decode() == "scalar"

    def test_isa_check_refuses_avx2_without_the_flags(self):
        assert pk.isa_supported("avx2", flags={"sse2", "avx"}, arch="x86_64")[0] is False
        assert pk.isa_supported("avx2", flags={"avx2", "fma"}, arch="x86_64")[0] is False
        assert pk.isa_supported("avx2", flags={"avx2", "fma", "f16c"}, arch="x86_64")[0] is True
        assert pk.isa_supported("avx2", flags={"avx2", "fma", "f16c"}, arch="aarch64")[0] is False
        assert pk.isa_supported("neon", flags=set(), arch="x86_64")[0] is False
        assert pk.isa_supported("scalar", flags=set(), arch="riscv64")[0] is True

    def test_loader_refuses_a_stale_library(self):
        with tempfile.TemporaryDirectory(prefix="picolm-test-") as tmp:
            tmp_path = pathlib.Path(tmp)
            variant("native")
            src = tmp_path / "other.c"
            with open(pk.SOURCE, "rb") as f:
                src.write_bytes(f.read() + b"\n/* changed */\n")
            out = str(tmp_path / "stale.so")
            saved = pk.SOURCE
            try:
                pk.SOURCE = str(src)  # build from a changed source ...
                assert build_accel.build(quiet=True, output=out)
            finally:
                pk.SOURCE = saved
            lib = pk.load(out)  # ... and the loader, comparing with the real source, refuses it
            assert lib is None
            assert "another version" in pk.reason
            assert pk.load(str(tmp_path / "absent.so")) is None
            assert "no accelerator library" in pk.reason

    def test_load_or_build_rebuilds_a_missing_or_stale_library(self):
        """In a copy of the package: no library -> built on first use; the C file changed ->
        the stale library is refused unloaded and rebuilt (in a fresh process each time)."""
        with tempfile.TemporaryDirectory(prefix="picolm-test-") as tmp:
            tmp_path = pathlib.Path(tmp)
            import subprocess
            variant("native")  # skips when there is no compiler
            shutil.copytree(os.path.join(ROOT, "picolm_kernels"), str(tmp_path / "picolm_kernels"),
                            ignore=shutil.ignore_patterns("*.so", "*.dylib", "*.dll", "__pycache__"))
            shutil.copytree(os.path.join(ROOT, "tools"), str(tmp_path / "tools"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            script = ("import picolm_kernels as pk; first = pk.load(); lib = pk.load_or_build(); "
                      "print(first is None, lib is not None, pk.reason == '')")
            for _ in range(2):
                out = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path),
                                     capture_output=True, text=True, timeout=300)
                assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr
                with open(str(tmp_path / "picolm_kernels" / "picolm_kernels.c"), "a") as f:
                    f.write("/* changed */\n")


class TestKernels(unittest.TestCase):
    """Kernels against the quant zoo."""

    @classmethod
    def setUpClass(cls):
        cls.zoo = load_zoo()

    def test_dequantize_bit_exact(self):
        zoo = self.zoo
        for kind in KINDS:
            with self.subTest(kind=kind):
                lib = variant(kind)
                source = zoo["floats"]("source")
                got = pk.dequantize(lib, 0, zoo["raw"]("source")[0], len(source))
                assert got.tobytes() == source.tobytes()
                for name in ZOO_TYPES:
                    data, t, shape = zoo["raw"](name + ".q")
                    expect = zoo["floats"](name + ".expect")
                    got = pk.dequantize(lib, t, data, shape[0] * shape[1])
                    assert got.tobytes() == expect.tobytes(), "%s: dequantization differs" % name

    def test_matvec_float_activations(self):
        zoo = self.zoo
        for kind in KINDS:
            with self.subTest(kind=kind):
                lib = variant(kind)
                x = zoo["floats"]("x")
                n = len(x)
                xn = norm(x)
                with pk.Pool(lib, 2) as pool:
                    for name in ZOO_TYPES + ["source"]:
                        if name == "source":
                            data, t, shape = zoo["raw"]("source")
                            expect, y = zoo["floats"]("source"), None
                        else:
                            data, t, shape = zoo["raw"](name + ".q")
                            expect, y = zoo["floats"](name + ".expect"), zoo["floats"](name + ".y")
                        rows = shape[1]
                        got = pk.matmul(lib, t, data, n, rows, x, pool=pool)
                        for r in range(rows):
                            row = expect[r * n:(r + 1) * n]
                            ref = y[r] if y is not None else math.fsum(a * b for a, b in zip(row, x))
                            tol = 1e-5 * norm(row) * xn
                            assert abs(got[r] - ref) <= tol, "%s row %d: %r vs %r" % (name, r, got[r], ref)

    def test_matvec_quantized_activations_within_bound(self):
        zoo = self.zoo
        for kind in KINDS:
            with self.subTest(kind=kind):
                lib = variant(kind)
                x = zoo["floats"]("x")
                n = len(x)
                worst = {}
                for name in ZOO_TYPES:
                    data, t, shape = zoo["raw"](name + ".q")
                    if not lib.pk_type_has_qa(t):
                        continue
                    expect, y = zoo["floats"](name + ".expect"), zoo["floats"](name + ".y")
                    rows = shape[1]
                    bits = lib.pk_type_has_qa(t)
                    got = pk.matmul(lib, t, data, n, rows, x, quantize=True)
                    for r in range(rows):
                        row = expect[r * n:(r + 1) * n]
                        err = abs(got[r] - y[r])
                        bound = qa_bound(row, x, bits)
                        assert err <= bound, "%s row %d: error %g > bound %g" % (name, r, err, bound)
                        scale = norm(row) * norm(x)
                        if scale and bits == 16:
                            worst[name] = max(worst.get(name, 0.0), err / scale)
                assert {"Q4_0", "Q5_0", "Q5_1", "IQ4_NL"} <= set(worst)
                if lib.pk_isa() == b"avx2":
                    assert {"Q4_K", "Q5_K", "Q6_K"} <= set(worst)
                # measured on the zoo: 16-bit activations are within the 1e-5 asked of float ones
                assert max(worst.values()) < 1e-5, worst

    def test_q8_kernels_follow_ggml_bit_for_bit(self):
        """Q4_1 and Q8_0 with quantized activations give ggml's float32 results exactly."""
        zoo = self.zoo
        x = zoo["floats"]("x")
        n = len(x)
        for name in ("Q4_1", "Q8_0"):
            data, t, shape = zoo["raw"](name + ".q")
            rows, rb = shape[1], len(data) // shape[1]
            want = [ggml_dot_q8(t, data[r * rb:(r + 1) * rb], x) for r in range(rows)]
            for kind in KINDS:
                with self.subTest(type=name, kind=kind):
                    lib = variant(kind)
                    self.assertEqual(lib.pk_type_has_qa(t), 8)
                    got = pk.matmul(lib, t, data, n, rows, x, quantize=True)
                    self.assertEqual(list(got), want)

    def test_activation_quantization_error_per_value(self):
        for kind in ["native", "plain"]:
            with self.subTest(kind=kind):
                lib = variant(kind)
                import random
                rng = random.Random(5)
                x = [rng.gauss(0, 1) * (10 ** rng.uniform(-3, 3)) for _ in range(32 * 40)] + [0.0] * 32
                q, d, s = pk.quantize_act(lib, x)
                for b in range(len(x) // 32):
                    block = x[b * 32:(b + 1) * 32]
                    amax = max(abs(v) for v in block)
                    assert approx_equal(d[b], amax / 32767, rel=1e-6), (b, d[b], amax / 32767)
                    assert approx_equal(s[b], d[b] * sum(q[b * 32:(b + 1) * 32]), rel=1e-6, abs_tol=1e-30), (
                        b, s[b], d[b] * sum(q[b * 32:(b + 1) * 32]))
                    for v, qv in zip(block, q[b * 32:(b + 1) * 32]):
                        assert -32767 <= qv <= 32767
                        assert abs(v - qv * d[b]) <= d[b] * 0.5 * (1 + 1e-3) + 1e-30

    def test_batched_and_threaded_matmul_equal_single(self):
        zoo = self.zoo
        for kind in KINDS:
            with self.subTest(kind=kind):
                lib = variant(kind)
                x = zoo["floats"]("x")
                n = len(x)
                nt = 13  # the 8-, 4- and 1-token kernels
                xs = array.array("f", [v * (1 + 0.25 * t) for t in range(nt) for v in x])
                for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "F16"):
                    data, t, shape = zoo["raw"](name + ".q")
                    rows = shape[1]
                    for quantize in (False, True):
                        singles = [pk.matmul(lib, t, data, n, rows, xs[i * n:(i + 1) * n], quantize=quantize)
                                   for i in range(nt)]
                        with pk.Pool(lib, 3) as pool:
                            batch = pk.matmul(lib, t, data, n, rows, xs, n_tok=nt, quantize=quantize, pool=pool)
                        # the 4-token kernel sums in another order: equal within float rounding
                        expect = zoo["floats"](name + ".expect")
                        single = array.array("f", b"".join(s.tobytes() for s in singles))
                        for i, (a, b) in enumerate(zip(batch, single)):
                            tok, r = divmod(i, rows)
                            scale = norm(expect[r * n:(r + 1) * n]) * norm(xs[tok * n:(tok + 1) * n])
                            assert abs(a - b) <= 1e-6 * scale, (name, quantize, tok, r, a, b)

    def test_fp16_conversion_matches_ieee_round_to_nearest(self):
        for kind in ["native", "plain"]:
            with self.subTest(kind=kind):
                lib = variant(kind)
                values = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, -65519.99, 65520.0, 1e6, -1e6,
                          5.96e-8, 2.98e-8, 2.99e-8, 1e-9, 6.1e-5, 6.09e-5, 3.14159265, 1 / 3.0,
                          float("inf"), -float("inf")]
                values += [math.ldexp(1 + i / 4096.0, e) for e in range(-26, 17, 3) for i in range(0, 4096, 97)]
                values = [struct.unpack("f", struct.pack("f", v))[0] for v in values]  # as float32
                xs = array.array("f", values)
                out = array.array("H", bytes(2 * len(xs)))
                lib.pk_f32_to_f16(xs.buffer_info()[0], out.buffer_info()[0], len(xs))
                for v, h in zip(values, out):
                    try:
                        want = struct.unpack("<H", struct.pack("<e", v))[0]
                    except OverflowError:
                        want = 0x7C00 | (0x8000 if v < 0 else 0)
                    assert h == want, "%r -> %04x, expected %04x" % (v, h, want)

    def test_top_orders_like_a_stable_sort(self):
        rng = random.Random(5)
        for kind in ["native", "plain"]:
            lib = variant(kind)
            for n, k in [(1, 1), (10, 3), (1000, 256), (300, 1000), (50, 0)]:
                with self.subTest(kind=kind, n=n, k=k):
                    # few distinct values: many ties, which the lower id wins
                    xs = array.array("f", [rng.choice([-1e30, -2.5, 0.0, 0.5, 3.0]) + rng.randrange(3)
                                           for _ in range(n)])
                    ids = (ctypes.c_int64 * max(k, 1))()
                    got = ids[:lib.pk_top(xs.buffer_info()[0], n, k, ids)]
                    want = sorted(range(n), key=lambda i: -xs[i])[:k]
                    assert got == want, (got[:8], want[:8])

    def test_pool_survives_many_dispatches_and_idle_sleep(self):
        zoo = self.zoo
        lib = variant("native")
        import time
        x = zoo["floats"]("x")
        data, t, shape = zoo["raw"]("Q4_1.q")
        ref = pk.matmul(lib, t, data, len(x), shape[1], x, quantize=True)
        with pk.Pool(lib, 2) as pool:
            assert pool.threads == 2
            for i in range(300):
                if i % 100 == 99:
                    time.sleep(0.01)  # the worker gives up spinning and sleeps
                got = pk.matmul(lib, t, data, len(x), shape[1], x, quantize=True, pool=pool)
                assert got.tobytes() == ref.tobytes()


class TestForwardAgainstLlamaCpp(unittest.TestCase):
    """The forward pass against llama.cpp."""

    def test_greedy_tokens_equal_llama_cpp(self):
        """Each reference prompt evaluated in one call, then 48 greedy tokens one at a time
        (as llama.cpp made them): exactly llama.cpp's tokens, with 1 and 2 threads."""
        for threads in [1, 2]:
            with self.subTest(threads=threads):
                model = accel_model(threads)[0]
                for case in reference()["greedy"]:
                    self.assertEqual(greedy(model, case["prompt_ids"], len(case["gen_ids"])),
                                     case["gen_ids"], case["prompt"])

    def test_nll_equals_llama_cpp_token_by_token(self):
        """Token by token, the logits are llama.cpp's token-by-token ones: its per-position
        negative log-likelihood (tests/data/*.nll.json, nll_single) to 1e-9."""
        nll = nll_reference()
        ids = nll["ids"]
        model = accel_model(2)[0]
        for pos in range(64):
            self.assertAlmostEqual(neg_log_likelihood(model.forward([ids[pos]], pos), ids[pos + 1]),
                                   nll["nll_single"][pos], delta=1e-9, msg="position %d" % pos)

    def test_fallback_builds_forward_like_native(self):
        """The SSE2 and plain-C builds (the code ARM and other CPUs run: software FP16, scalar
        kernels, libm's fmaf) give the native build's logits bit for bit."""
        for kind in ["portable", "plain"]:
            with self.subTest(kind=kind):
                case = reference()["greedy"][2]
                native = accel_model(1, n_ctx=128)[0]
                other = accel_model(2, n_ctx=128, kind=kind)[0]
                a = native.forward(case["prompt_ids"], 0)
                b = other.forward(case["prompt_ids"], 0)
                self.assertEqual(a, b)
                assert greedy(other, case["prompt_ids"], 8) == case["gen_ids"][:8]

    def test_perplexity_equals_llama_cpp(self):
        """In batches (64-token calls here, one 512-token batch there) the logits are
        llama.cpp's batched ones: its per-position negative log-likelihood over the 512
        reference tokens to 1e-9, hence its perplexity."""
        nll = nll_reference()
        ids = nll["ids"]
        self.assertEqual(ids, reference()["ppl"]["ids"])
        model = accel_model(2, n_ctx=len(ids))[0]
        nv, total = model.n_vocab, 0.0
        for start in range(0, len(ids) - 1, 64):
            chunk = ids[start:start + 64]
            logits = model.forward_all(chunk, start)
            for i in range(min(len(chunk), len(ids) - 1 - start)):
                ours = neg_log_likelihood(logits[i * nv:(i + 1) * nv], ids[start + i + 1])
                self.assertAlmostEqual(ours, nll["nll_batched"][start + i], delta=1e-9,
                                       msg="position %d" % (start + i))
                total += ours
        ppl = math.exp(total / (len(ids) - 1))
        self.assertLess(abs(ppl / reference()["ppl"]["ppl"] - 1), 1e-9)

    def test_first_layer_cache_matches_python_math(self):
        """Layer 0's K and V rows, written by the C forward into the caller's FP16 cache, equal
        the reference math (embedding row, RMSNorm in float32, its output rounded to 8-bit
        blocks as for llama.cpp's Q4_1 matrices, Wk/Wv, RoPE with NORM or NEOX pairing and
        optional frequency factors) done here in Python with float64 on the dequantized
        weights."""
        for pairing, factors in [("norm", False), ("neox", False), ("norm", True)]:
            with self.subTest(pairing=pairing, factors=factors):
                lib = variant("native")
                path = model_or_skip()
                data, table, meta = read_gguf(path)
                cfg = Hparams(meta, table)
                cfg.rope_pairing = pairing
                n_ctx = 8
                half = cfg.rope_dim // 2
                freq_factors = [1.0 + 0.5 * i / half for i in range(half)] if factors else None
                kv = kv_buffer(cfg, n_ctx)
                model = pk.AcceleratedModel(lib, path, cfg, {k: v[:3] for k, v in table.items()}, n_ctx,
                                            kv, threads=1, freq_factors=freq_factors)

                def rows(name):
                    off, t, shape, nbytes = table[name]
                    return pk.dequantize(lib, t, data[off:off + nbytes], shape[0] * _rows(shape)), shape

                tokens = [1, 504, 2103, 77]
                model.forward(tokens, 0, want_logits=False)
                model.close()
                emb, shape = rows("token_embd.weight")
                norm_w, _ = rows("blk.0.attn_norm.weight")
                wk, _ = rows("blk.0.attn_k.weight")
                wv, _ = rows("blk.0.attn_v.weight")
                E, kvd, hd = cfg.n_embd, cfg.n_head_kv * cfg.head_dim, cfg.head_dim
                for pos, tok in enumerate(tokens):
                    x = emb[tok * E:(tok + 1) * E]
                    mean = f32(sum(f32(v * v) for v in x) / E)
                    scale = f32(1.0 / f32(math.sqrt(f32(mean + f32(cfg.norm_eps)))))
                    xb = [f32(f32(v * scale) * w) for v, w in zip(x, norm_w)]
                    for b in range(0, E, 32):  # ggml's Q8 blocks
                        amax = max(abs(v) for v in xb[b:b + 32])
                        d, inv = f16(f32(amax / 127.0)), f32(127.0 / amax) if amax else 0.0
                        xb[b:b + 32] = [round(f32(v * inv)) * d for v in xb[b:b + 32]]
                    k = [math.fsum(a * b for a, b in zip(wk[r * E:(r + 1) * E], xb)) for r in range(kvd)]
                    v = [math.fsum(a * b for a, b in zip(wv[r * E:(r + 1) * E], xb)) for r in range(kvd)]
                    for h in range(cfg.n_head_kv):
                        for i in range(half):
                            theta = pos * cfg.rope_base ** (-2.0 * i / cfg.rope_dim)
                            if freq_factors:
                                theta /= freq_factors[i]
                            first, second = (2 * i, 2 * i + 1) if pairing == "norm" else (i, i + half)
                            a, b = k[h * hd + first], k[h * hd + second]
                            k[h * hd + first] = a * math.cos(theta) - b * math.sin(theta)
                            k[h * hd + second] = a * math.sin(theta) + b * math.cos(theta)
                    got_k = struct.unpack_from("<%de" % kvd, kv, pos * kvd * 2)
                    got_v = struct.unpack_from("<%de" % kvd, kv, n_ctx * kvd * 2 + pos * kvd * 2)
                    for want, got in ((k, got_k), (v, got_v)):
                        scale_ref = max(abs(w) for w in want)
                        err = max(abs(a - b) for a, b in zip(want, got))
                        # FP16 storage: 2^-11 relative; the dot itself is within 1e-5
                        assert err < 1e-3 * scale_ref, (pos, err, scale_ref)

    def test_model_description_errors_are_one_line(self):
        lib = variant("native")
        path = model_or_skip()
        _, table, meta = read_gguf(path)
        cfg = Hparams(meta, table)
        tensors = {k: v[:3] for k, v in table.items()}
        kv = kv_buffer(cfg, 8)
        bad = dict(tensors)
        off, t, shape = bad["blk.3.attn_k.weight"]
        bad["blk.3.attn_k.weight"] = (off, t, (shape[0], shape[1] + 32))
        with self.assertRaisesRegex(ValueError, "attn_k: shape"):
            pk.AcceleratedModel(lib, path, cfg, bad, 8, kv)
        bad = dict(tensors)
        bad["blk.0.ffn_up.weight"] = (os.path.getsize(path) - 100,) + tensors["blk.0.ffn_up.weight"][1:]
        with self.assertRaisesRegex(ValueError, "past the end"):
            pk.AcceleratedModel(lib, path, cfg, bad, 8, kv)
        bad = dict(tensors)
        bad["blk.0.ffn_up.weight"] = (tensors["blk.0.ffn_up.weight"][0], 19) + tensors["blk.0.ffn_up.weight"][2:]
        with self.assertRaisesRegex(ValueError, "type 19 has no kernel"):
            pk.AcceleratedModel(lib, path, cfg, bad, 8, kv)
        with self.assertRaisesRegex(ValueError, "missing tensor"):
            pk.AcceleratedModel(lib, path, cfg, {k: v for k, v in tensors.items()
                                                 if k != "blk.1.ffn_norm.weight"}, 8, kv)
        with self.assertRaisesRegex(ValueError, "cannot open"):
            pk.AcceleratedModel(lib, path + ".absent", cfg, tensors, 8, kv)
        with self.assertRaisesRegex(ValueError, "smaller"):
            pk.AcceleratedModel(lib, path, cfg, tensors, 8, mmap.mmap(-1, 4096))

    def test_forward_rejects_bad_arguments(self):
        model = accel_model(1)[0]
        with self.assertRaises(ValueError):
            model.forward([model.n_vocab], 0)
        with self.assertRaises(ValueError):
            model.forward([1, 2], model.n_ctx - 1)
        with self.assertRaises(ValueError):
            model.forward([-1], 0)


if __name__ == "__main__":
    unittest.main()
