"""The GGUF reader: it reads back everything our writer writes, and it turns every
malformed file into one clean error (picolm.PicoError in-process; through the CLI one
line `picolm: error: FILE: ...` on stderr and exit status 2), fast and without big
allocations.

Run: python3 -m unittest tests.test_gguf -v
"""
import contextlib
import io
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import unittest
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import picolm  # noqa: E402
import gguf_writer as gw  # noqa: E402
from gguf_writer import (Arr, GGUFWriter, Raw, Typed, UINT8, INT8, UINT16, INT16,  # noqa: E402
                         UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64)

PICOLM = os.path.join(ROOT, "picolm.py")
CLI_TIMEOUT = 8  # a malformed file fails in well under a second, even on a loaded machine
CASE_SECONDS = 2  # in-process limit for one malformed file (a valid one loads in ~0.1 s)
GB = 1 << 30

TMP = None


def setUpModule():
    global TMP
    TMP = gw.fast_tmpdir("picolm-test-gguf-")


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def supported_types():
    """Names of the tensor types both picolm and our writer know."""
    return [name for name in gw.BLOCKS if gw.GGML_TYPES[name] in picolm.QUANT_TYPES]


# ---------------------------------------------------------------------------
# Running picolm on a file: in-process under time and memory limits, and as the CLI

class CaseTimeout(Exception):
    pass


def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def limited(seconds=CASE_SECONDS, extra_memory=GB):
    """Runs the block with a timer and an address-space limit of what the process has
    now plus extra_memory: a hang or a huge allocation fails the test instead of the box."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + extra_memory
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def on_alarm(signum, frame):
        raise CaseTimeout("took more than %s s" % seconds)

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # warnings of odd files
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def limit_memory(nbytes):
    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return preexec


def run_cli(path, args=("-p", "hi", "-n", "1"), memory=None, timeout=CLI_TIMEOUT):
    """(returncode, stdout, stderr, seconds) of `python3 picolm.py path args`."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, PICOLM, path] + list(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
            preexec_fn=limit_memory(memory) if memory else None)
    except subprocess.TimeoutExpired:
        return None, "", "timed out after %d s" % timeout, time.perf_counter() - start
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"), time.perf_counter() - start)


def run_main_forked(paths, args=("-p", "hi", "-n", "1"), timeout=CLI_TIMEOUT,
                    extra_memory=GB, jobs=4):
    """Like run_cli for each path, but a fork of this process runs picolm.main([path] +
    args): the command line's own code without an interpreter start per file, `jobs`
    children at a time, each with the time and memory limits of run_cli."""
    limit = vm_size() + extra_memory
    results = [None] * len(paths)
    running = {}  # pid -> (index, out file, err file, start)
    pending = list(enumerate(paths))
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        while pending and len(running) < jobs:
            index, path = pending.pop(0)
            out = tempfile.TemporaryFile(dir=TMP)
            err = tempfile.TemporaryFile(dir=TMP)
            pid = os.fork()
            if pid == 0:
                _forked_main(path, args, out, err, limit)  # never returns
            running[pid] = (index, out, err, time.monotonic())
        for pid, (index, out, err, start) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results[index] = (None, "", "timed out after %d s" % timeout, timeout)
            elif done:
                out.seek(0)
                err.seek(0)
                rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
                results[index] = (rc, out.read().decode("utf-8", "replace"),
                                  err.read().decode("utf-8", "replace"),
                                  time.monotonic() - start)
            else:
                continue
            out.close()
            err.close()
            del running[pid]
        time.sleep(0.002)
    return results


def _forked_main(path, args, out, err, limit):
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY
                                                else min(limit, hard), hard))
        code = picolm.main([path] + list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def cli_error_problem(path, result):
    """None if result is exactly one clean error line and exit status 2, else what's wrong."""
    rc, out, err, _ = result
    if rc != 2:
        return "exit status %r, stderr: %s" % (rc, err[-1500:])
    if "Traceback" in err:
        return "traceback: " + err[-1500:]
    lines = err.splitlines()
    if len(lines) != 1 or not err.endswith("\n"):
        return "stderr is not one line: %r" % err[:1500]
    if not re.match(r"picolm: error: %s: \S" % re.escape(path), lines[0]):
        return "stderr is not 'picolm: error: FILE: ...': %r" % lines[0]
    if out:
        return "stdout is not empty: %r" % out[:200]
    return None


def message_problem(error):
    text = str(error)
    if not text.strip():
        return "empty message"
    if "\n" in text or "\r" in text:
        return "message of several lines: %r" % text
    return None


# ---------------------------------------------------------------------------
# The files

def f32_tensor(values):
    return struct.pack("<%df" % len(values), *values)


def every_value_kind(w):
    """Adds a key of every value type (and arrays, nested too) to writer w; returns
    {key: expected value as read back}."""
    f32 = gw.f32
    entries = [
        ("t.u8", 255, UINT8), ("t.u8.zero", 0, UINT8), ("t.i8", -128, INT8),
        ("t.i8.max", 127, INT8), ("t.u16", 65535, UINT16), ("t.i16", -32768, INT16),
        ("t.u32", 4294967295, UINT32), ("t.i32", -2147483648, INT32),
        ("t.f32", 1.5, FLOAT32), ("t.f32.tiny", 1e-5, FLOAT32), ("t.f32.neg", -0.0, FLOAT32),
        ("t.f32.inf", math.inf, FLOAT32), ("t.bool.true", True, BOOL),
        ("t.bool.false", False, BOOL), ("t.string", "h\u00e9llo \u4e16\u754c \U0001F600", STRING),
        ("t.string.empty", "", STRING), ("t.u64", 2 ** 64 - 1, UINT64),
        ("t.i64", -2 ** 63, INT64), ("t.f64", math.pi, FLOAT64), ("t.f64.big", 1e300, FLOAT64),
    ]
    expected = {}
    for key, value, vtype in entries:
        w.add(key, value, vtype)
        expected[key] = f32(value) if vtype == FLOAT32 else value
    arrays = {
        "a.u8": Arr(UINT8, [0, 1, 255]), "a.i8": Arr(INT8, [-128, 0, 127]),
        "a.u16": Arr(UINT16, [0, 65535]), "a.i16": Arr(INT16, [-32768, 32767]),
        "a.u32": Arr(UINT32, [0, 4294967295]), "a.i32": Arr(INT32, [-1, 2 ** 31 - 1]),
        "a.f32": Arr(FLOAT32, [0.5, -2.25, 1e-3]), "a.bool": Arr(BOOL, [True, False, True]),
        "a.u64": Arr(UINT64, [2 ** 64 - 1, 0]), "a.i64": Arr(INT64, [-2 ** 63, 2 ** 63 - 1]),
        "a.f64": Arr(FLOAT64, [math.e, -1e-300]),
        "a.string": Arr(STRING, ["a", "", "\u00fc\u00f1\u00ee", "x" * 300]),
        "a.empty.u8": Arr(UINT8, []), "a.empty.string": Arr(STRING, []),
        "a.empty.array": Arr(ARRAY, []),
        "a.nested": Arr(ARRAY, [Arr(UINT8, [1, 2]), Arr(STRING, ["x", "yz"]), Arr(INT64, []),
                                Arr(ARRAY, [Arr(FLOAT64, [0.25]), Arr(BOOL, [False])])]),
    }
    for key, arr in arrays.items():
        w.add(key, arr)
        expected[key] = plain(arr)
    return expected


def plain(arr):
    if arr.elem_type == ARRAY:
        return [plain(a) for a in arr.items]
    if arr.elem_type == FLOAT32:
        return [gw.f32(v) for v in arr.items]
    if arr.elem_type == STRING:  # picolm keeps strings in arrays as the file's UTF-8
        return [v.encode("utf-8") for v in arr.items]
    return list(arr.items)


def small_file_writer(version=3, alignment=None):
    """A small non-model file with keys of every kind and tensors of several shapes."""
    w = GGUFWriter(version=version, alignment=alignment)
    w.add("general.architecture", "test")
    expected = every_value_kind(w)
    rng = random.Random(1)
    tensors = {}
    for name, t, shape in (("one", "F32", (3,)), ("two", "F16", (5, 3)),
                           ("q8", "Q8_0", (64, 2)), ("three", "F32", (2, 3, 4)),
                           ("four", "F16", (1, 2, 1, 3))):
        n = 1
        for d in shape:
            n *= d
        data, _ = gw.random_tensor(t, n, rng)
        w.add_tensor(name, t, shape, data)
        tensors[name] = (gw.GGML_TYPES[t], shape, data)
    return w, expected, tensors


class TestReadBack(unittest.TestCase):
    """Everything the writer writes comes back from picolm.GGUFFile."""

    def write(self, name, w):
        path = os.path.join(TMP, name)
        w.write(path)
        return path

    def check_file(self, path, expected, tensors, version, alignment):
        with picolm.GGUFFile(path) as f:
            self.assertEqual(f.version, version)
            self.assertEqual(f.alignment, alignment)
            for key, value in expected.items():
                self.assertIn(key, f.metadata)
                got = f.metadata[key]
                self.assertEqual(got, value, key)
                self.assertEqual(type(got), type(value), key)
                if isinstance(value, float) and value == 0:
                    self.assertEqual(math.copysign(1, got), math.copysign(1, value), key)
            self.assertEqual(set(f.tensors), set(tensors))
            self.assertEqual(f.data_start % alignment, 0)
            for name, (t, shape, data) in tensors.items():
                tensor = f.tensors[name]
                self.assertEqual(tensor.type, t)
                self.assertEqual(tuple(tensor.shape), shape)
                self.assertEqual(tensor.n_cols, shape[0])
                n_rows = 1
                for d in shape[1:]:
                    n_rows *= d
                self.assertEqual(tensor.n_rows, n_rows)
                self.assertIsInstance(tensor.data, memoryview)
                self.assertEqual(bytes(tensor.data), data)
                self.assertEqual(tensor.offset % alignment, 0)

    def test_every_value_type_v2_and_v3(self):
        for version in (2, 3):
            with self.subTest(version=version):
                w, expected, tensors = small_file_writer(version)
                path = self.write("kinds-v%d.gguf" % version, w)
                self.check_file(path, expected, tensors, version, 32)

    def test_custom_alignment(self):
        for alignment in (1, 2, 8, 16, 64, 256, 4096):
            with self.subTest(alignment=alignment):
                w, expected, tensors = small_file_writer(3, alignment)
                expected["general.alignment"] = alignment
                path = self.write("align-%d.gguf" % alignment, w)
                self.check_file(path, expected, tensors, 3, alignment)

    def test_no_tensors_and_no_keys(self):
        path = self.write("empty-model.gguf", GGUFWriter())
        with picolm.GGUFFile(path) as f:
            self.assertEqual(f.metadata, {})
            self.assertEqual(f.tensors, {})

    def test_odd_strings_do_not_crash(self):
        w = GGUFWriter()
        w.add("bad.utf8", Typed(STRING, b"\xff\xfe ok \xc3"))
        w.add("\u00e9t\u00e9.key", "v")
        w.add("long", "z" * 100000)
        path = self.write("strings.gguf", w)
        with picolm.GGUFFile(path) as f:
            self.assertIn(" ok ", f.metadata["bad.utf8"])
            self.assertEqual(f.metadata["\u00e9t\u00e9.key"], "v")
            self.assertEqual(f.metadata["long"], "z" * 100000)

    def test_nested_arrays_to_depth_8(self):
        value = Arr(UINT8, [7])
        for _ in range(7):
            value = Arr(ARRAY, [value])
        w = GGUFWriter()
        w.add("deep", value)
        path = self.write("deep.gguf", w)
        with picolm.GGUFFile(path) as f:
            got = f.metadata["deep"]
        for _ in range(7):
            self.assertEqual(len(got), 1)
            got = got[0]
        self.assertEqual(got, [7])

    def test_every_supported_tensor_type(self):
        """Random valid blocks of every type picolm supports: bytes, shape and
        picolm.dequantize agree with our own decoder (checked against ggml's)."""
        rng = random.Random(5)
        w = GGUFWriter()
        expected = {}
        for name in supported_types():
            block = gw.BLOCKS[name][0]
            shape = (max(block, 32) * 2, 3)
            data, values = gw.random_tensor(name, shape[0] * shape[1], rng)
            w.add_tensor("t." + name, name, shape, data)
            expected[name] = (shape, data, values)
        path = self.write("types.gguf", w)
        with picolm.GGUFFile(path) as f:
            for name, (shape, data, values) in expected.items():
                with self.subTest(type=name):
                    tensor = f.tensors["t." + name]
                    self.assertEqual(tensor.type, gw.GGML_TYPES[name])
                    self.assertEqual(tensor.shape, shape)
                    self.assertEqual(bytes(tensor.data), data)
                    self.assertEqual(picolm.row_bytes(tensor.type, shape[0]),
                                     len(data) // shape[1])
                    got = picolm.dequantize(tensor.type, tensor.data, len(values))
                    worst = max(abs(a - b) for a, b in zip(got, values))
                    self.assertLessEqual(worst, 1e-6 * max(map(abs, values)))

    def test_tiny_llama_metadata_as_written(self):
        path = os.path.join(TMP, "tiny-readback.gguf")
        tiny = gw.make_tiny_llama(path, "Q8_0", n_vocab=280, tied=False, alignment=64)
        with open(path, "rb") as f:
            version, kv, tensors, alignment, _ = gw.read_gguf(f.read())
        with picolm.GGUFFile(path) as f:
            self.assertEqual(f.alignment, 64)
            self.assertEqual(list(f.metadata), [k for k, _, _ in kv])
            for key, _, value in kv:
                self.assertEqual(f.metadata[key], value, key)
            self.assertEqual(f.metadata["tokenizer.ggml.tokens"],
                             [t.encode("utf-8") for t in tiny.tokens])
            self.assertEqual(set(f.tensors), set(tensors))
            for name, (t, shape, data) in tensors.items():
                self.assertEqual((f.tensors[name].type, f.tensors[name].shape), (t, shape))
                self.assertEqual(bytes(f.tensors[name].data), data)


class TestWriterItself(unittest.TestCase):
    """The test tools are right: our block decoders reproduce ggml's, bit for bit."""

    def test_decoders_and_quantizers_match_ggml(self):
        with open(os.path.join(HERE, "data", "quant-zoo.gguf"), "rb") as f:
            _, _, tensors, _, _ = gw.read_gguf(f.read())
        source = tensors["source"]
        n = source[1][0] * source[1][1]
        values = struct.unpack("<%df" % n, source[2])
        for name in ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                     "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"):
            with self.subTest(type=name):
                t, shape, data = tensors[name + ".q"]
                self.assertEqual(t, gw.GGML_TYPES[name])
                expect = struct.unpack("<%df" % n, tensors[name + ".expect"][2])
                mine = [gw.f32(v) for v in gw.dequantize(t, data, n)]
                self.assertEqual(mine, list(expect))
                if name in ("F16", "BF16", "Q4_0", "Q4_1", "Q8_0"):
                    self.assertEqual(gw.quantize(name, values), data)

    def test_random_blocks_are_sensible(self):
        rng = random.Random(3)
        for name in gw.BLOCKS:
            with self.subTest(type=name):
                n = gw.BLOCKS[name][0] * 8 if gw.BLOCKS[name][0] > 1 else 256
                data, values = gw.random_tensor(name, n, rng, 0.25)
                self.assertEqual(len(data), n // gw.BLOCKS[name][0] * gw.BLOCKS[name][1])
                self.assertEqual(values, gw.dequantize(name, data, n))
                self.assertTrue(all(math.isfinite(v) for v in values))
                peak = max(map(abs, values))
                self.assertTrue(0.05 <= peak <= 0.6, peak)

    def test_corrupting_fields(self):
        w = GGUFWriter()
        w.add("k", 5)
        built = w.build().patch("kv:k.type", 10)
        self.assertEqual(struct.unpack_from("<I", built.buf, built.fields["kv:k.type"].offset),
                         (10,))


# ---------------------------------------------------------------------------
# The corpus of broken files

U64_MAX = 2 ** 64 - 1
# GGUFFile itself must refuse / only Model must / odd but usable: a clean error or a load
FILE, MODEL, ANY = "file", "model", "any"


class Corpus:
    """Malformed files, each a valid tiny model with one thing wrong (or no file at all)."""

    def __init__(self, directory):
        self.dir = directory
        self.base_path = os.path.join(directory, "base.gguf")
        self.tiny = gw.make_tiny_llama(self.base_path, "Q8_0", n_vocab=270, seed=7)
        self.base = self.tiny.built
        self.cases = []  # (name, level, path)
        self.build()

    # -- helpers -------------------------------------------------------------
    def add(self, name, level, data):
        path = os.path.join(self.dir, name + ".gguf")
        with open(path, "wb") as f:
            f.write(data)
        self.cases.append((name, level, path))

    def patched(self, name, level, *patches):
        built = gw.Built(bytearray(self.base.buf), self.base.fields)
        for label, value in patches:
            built.patch(label, value)
        self.add(name, level, built.bytes())

    def rewritten(self, name, level, edit):
        w = self.tiny.writer.clone()
        result = edit(w)
        built = w.build() if result is None else result
        self.add(name, level, built.bytes())

    def metadata(self, name, key, value, vtype=None, level=MODEL):
        self.rewritten(name, level, lambda w: w.set(key, value, vtype) and None)

    def field(self, label):
        return self.base.fields[label]

    # -- the cases -------------------------------------------------------------
    def build(self):
        base = self.base.bytes()
        fields = self.base.fields
        n_kv, n_tensors = len(self.tiny.writer.kv), len(self.tiny.writer.tensors)

        # no file / not a file
        os.mkdir(os.path.join(self.dir, "a-directory"))
        self.cases.append(("directory", FILE, os.path.join(self.dir, "a-directory")))
        self.cases.append(("missing", FILE, os.path.join(self.dir, "no-such-file.gguf")))
        self.add("empty", FILE, b"")

        # header
        self.add("magic-only", FILE, b"GGUF")
        self.add("header-23-bytes", FILE, base[:23])
        self.add("header-only", FILE, base[:24])
        self.add("bad-magic", FILE, b"GGML" + base[4:])
        self.add("lowercase-magic", FILE, b"gguf" + base[4:])
        self.add("zeros", FILE, bytes(4096))
        for version in (0, 1, 4, 0xFFFFFFFF):
            self.patched("version-%d" % version, FILE, ("version", version))
        big = self.tiny.writer.clone()
        big.endian = ">"
        self.add("big-endian", FILE, big.build().bytes())
        self.add("big-endian-v2", FILE, b"GGUF" + struct.pack(">IQQ", 2, 1, 1) + base[24:])
        for n in (2 ** 63, U64_MAX, 2 ** 62, 2 ** 40, n_kv + 1, n_kv + 1000, n_kv - 1):
            self.patched("n_kv-%d" % n, FILE, ("n_kv", n))
        for n in (2 ** 63, U64_MAX, 2 ** 40, n_tensors + 1):
            self.patched("n_tensors-%d" % n, FILE, ("n_tensors", n))
        self.patched("n_tensors-0", MODEL, ("n_tensors", 0))
        self.patched("n_tensors-minus-1", MODEL, ("n_tensors", n_tensors - 1))

        # key/value section
        arch = "kv:general.architecture"
        for n in (U64_MAX, 2 ** 63, len(base)):
            self.patched("key-length-%d" % n, FILE, (arch + ".key_len", n))
        for vtype in (13, 100, 0xFFFFFFFF):
            self.patched("value-type-%d" % vtype, FILE, (arch + ".type", vtype))
        for n in (U64_MAX, 2 ** 63, len(base)):
            self.patched("string-length-%d" % n, FILE, (arch + ".len", n))
        tokens = "kv:tokenizer.ggml.tokens"
        for n in (2 ** 62, 2 ** 40, U64_MAX, 2 ** 61 + 1):
            self.patched("string-array-count-%d" % n, FILE, (tokens + ".count", n))
        self.patched("array-elem-type-13", FILE, (tokens + ".elem_type", 13))
        self.patched("array-elem-type-0xffffffff", FILE, (tokens + ".elem_type", 0xFFFFFFFF))
        self.patched("strings-read-as-arrays", FILE, (tokens + ".elem_type", ARRAY))
        types = "kv:tokenizer.ggml.token_type"
        for n in (2 ** 62, 2 ** 40, U64_MAX):
            self.patched("i32-array-count-%d" % n, FILE, (types + ".count", n))
        self.patched("i32-array-read-as-f64", FILE, (types + ".elem_type", FLOAT64))
        self.patched("i32-array-read-as-u8", FILE, (types + ".elem_type", UINT8))
        huge_arrays = [
            ("u8-array-2^40", struct.pack("<IQ", UINT8, 2 ** 40)),
            ("f64-array-2^61", struct.pack("<IQ", FLOAT64, 2 ** 61)),
            ("array-of-arrays-2^62", struct.pack("<IQ", ARRAY, 2 ** 62)),
            ("nested-array-count-2^40", struct.pack("<IQIQ", ARRAY, 1, UINT8, 2 ** 40)),
            ("string-in-array-too-long", struct.pack("<IQQ", STRING, 2, 3) + b"abc"
             + struct.pack("<Q", U64_MAX)),
            ("nested-1000-deep", struct.pack("<IQ", ARRAY, 1) * 1000
             + struct.pack("<IQ", UINT8, 0)),
            ("nested-unknown-type", struct.pack("<IQIQ", ARRAY, 1, 77, 1)),
        ]
        for name, raw in huge_arrays:
            self.rewritten(name, FILE, lambda w, raw=raw: w.kv.insert(1, ("x", Raw(ARRAY, raw))))
        self.rewritten("unknown-value-type-last", FILE,
                       lambda w: w.kv.append(("x", Raw(13, b"\0" * 8))))
        self.rewritten("duplicate-key", FILE,
                       lambda w: w.kv.append(("general.architecture", "llama")))
        self.rewritten("duplicate-key-other-type", FILE,
                       lambda w: w.kv.append(("llama.block_count", "two")))
        self.rewritten("newline-in-key", FILE,
                       lambda w: w.kv.append(("bad\nkey\rx", Raw(13, b""))))
        w = self.tiny.writer.clone()
        w.kv.append(("bad\nkey", Typed(UINT64, 1)))
        built = w.build()
        self.add("newline-in-key-truncated", FILE,
                 built.truncated(built.fields["kv:bad\nkey.value"].offset + 1))

        # alignment
        for value, vtype in ((0, UINT32), (3, UINT32), (48, UINT32), (2 ** 31, UINT32),
                             (2 ** 63, UINT64), ("32", STRING), (True, BOOL), (32.0, FLOAT32),
                             (-32, INT32)):
            self.rewritten("alignment-%r-%s" % (value, gw.VALUE_TYPE_NAMES[vtype]), FILE,
                           lambda w, v=value, t=vtype: w.kv.insert(
                               0, ("general.alignment", Typed(t, v))) and None)

        # tensor infos
        q = "tensor:blk.0.attn_q.weight"
        norm = "tensor:blk.0.attn_norm.weight"
        for n in (U64_MAX, 2 ** 63, len(base)):
            self.patched("tensor-name-length-%d" % n, FILE, (q + ".name_len", n))
        for n in (0, 5, 1000, 0xFFFFFFFF):
            self.patched("n_dims-%d" % n, FILE, (q + ".n_dims", n))
        for label, value in (("dim0", 0), ("dim1", 0), ("dim0", 2 ** 63), ("dim1", U64_MAX),
                             ("dim0", 2 ** 32), ("dim1", 2 ** 32), ("dim0", 96), ("dim0", 65)):
            self.patched("%s-%d" % (label, value), FILE, ("%s.%s" % (q, label), value))
        self.patched("dims-product-wraps-2^64", FILE, (q + ".dim0", 2 ** 32),
                     (q + ".dim1", 2 ** 32))
        for t in (4, 5, 31, 36, 43, 1000, 0xFFFFFFFF, 9, 15, 16, 24, 28):
            if t not in picolm.QUANT_TYPES:
                self.patched("tensor-type-%d" % t, FILE, (q + ".type", t))
        self.patched("tensor-type-f32-too-big", FILE, (q + ".type", 0))
        offset = struct.unpack_from("<Q", self.base.buf, fields[q + ".offset"].offset)[0]
        data_size = self.field("data").size
        for value in (U64_MAX, 2 ** 63, U64_MAX - 31, 2 ** 64 - 2 ** 20, data_size,
                      data_size - 32, offset + 1, offset + 16, offset + 2):
            self.patched("offset-%d" % value, FILE, (q + ".offset", value))
        first = self.tiny.writer.tensors[0][0]
        first_offset = struct.unpack_from(
            "<Q", self.base.buf, fields["tensor:%s.offset" % first].offset)[0]
        self.patched("overlap-same-offset", FILE, (q + ".offset", first_offset))
        self.patched("overlap-partial", FILE, (q + ".offset", first_offset + 32))
        norm_offset = struct.unpack_from("<Q", self.base.buf, fields[norm + ".offset"].offset)[0]
        self.patched("overlap-into-norm", FILE, (q + ".offset", norm_offset))
        self.rewritten("duplicate-tensor", FILE,
                       lambda w: w.add_tensor(*w.tensor("blk.1.attn_k.weight")[:4]) and None)
        name_at = fields[q + ".name_len"].offset + 8
        dup = bytearray(base)
        dup[name_at:name_at + len("blk.0.attn_q.weight")] = b"blk.0.attn_k.weight"
        self.add("duplicate-tensor-renamed", FILE, bytes(dup))
        w = self.tiny.writer.clone()
        w.add_tensor("evil\nname", "F32", (4,), bytes(16))
        self.add("newline-in-tensor-name", FILE,
                 w.build().patch("tensor:evil\nname.n_dims", 9).bytes())
        end_of_data = max(f.offset + f.size for k, f in fields.items() if k.startswith("data:"))
        self.add("data-cut-1-byte-short", FILE, base[:end_of_data - 1])
        self.add("data-missing", FILE, base[:self.field("data").offset])
        self.add("infos-cut", FILE, base[:self.field("tensor_info").offset + 5])

        # model level: missing tensors and keys
        for name in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
                     "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                     "blk.1.ffn_down.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight",
                     "blk.1.attn_norm.weight", "blk.1.ffn_norm.weight"):
            self.rewritten("no-tensor-" + name, MODEL, lambda w, n=name: w.remove_tensor(n)
                           and None)
        for key in ("general.architecture", "llama.block_count", "llama.embedding_length",
                    "llama.feed_forward_length", "llama.attention.head_count",
                    "llama.context_length", "tokenizer.ggml.tokens", "tokenizer.ggml.model",
                    "tokenizer.ggml.merges"):
            self.metadata("no-key-" + key, key, None)

        # model level: hyper-parameters that do not match the tensors, or make no sense
        wrong = [
            ("llama.block_count", 3, None), ("llama.block_count", 1, None),
            ("llama.block_count", 0, None), ("llama.block_count", -1, INT32),
            ("llama.block_count", 2 ** 31, None), ("llama.block_count", 2 ** 32 - 1, None),
            ("llama.block_count", 2 ** 63, UINT64), ("llama.block_count", "2", None),
            ("llama.block_count", 2.0, None), ("llama.block_count", True, None),
            ("llama.block_count", Arr(UINT32, [2]), None),
            ("llama.embedding_length", 32, None), ("llama.embedding_length", 128, None),
            ("llama.embedding_length", 2 ** 40, UINT64), ("llama.embedding_length", 0, None),
            ("llama.feed_forward_length", 64, None), ("llama.feed_forward_length", 256, None),
            ("llama.feed_forward_length", 2 ** 63, UINT64),
            ("llama.attention.head_count", 8, None), ("llama.attention.head_count", 3, None),
            ("llama.attention.head_count", 2, None), ("llama.attention.head_count", 0, None),
            ("llama.attention.head_count", 2 ** 40, UINT64),
            ("llama.attention.head_count_kv", 1, None),
            ("llama.attention.head_count_kv", 3, None),
            ("llama.attention.head_count_kv", 4, None),
            ("llama.attention.head_count_kv", 0, None),
            ("llama.attention.key_length", 32, None),
            ("llama.attention.key_length", 2 ** 40, UINT64),
            ("llama.attention.value_length", 8, None),
            ("llama.rope.dimension_count", 3, None), ("llama.rope.dimension_count", 1000, None),
            ("llama.context_length", 0, None), ("llama.context_length", -5, INT32),
            ("llama.attention.layer_norm_rms_epsilon", 0.0, None),
            ("llama.attention.layer_norm_rms_epsilon", -1e-5, None),
            ("llama.attention.layer_norm_rms_epsilon", math.nan, None),
            ("llama.attention.layer_norm_rms_epsilon", math.inf, None),
            ("llama.attention.layer_norm_rms_epsilon", "small", None),
            ("llama.rope.freq_base", 0.0, None), ("llama.rope.freq_base", -10000.0, None),
            ("llama.rope.freq_base", math.nan, None), ("llama.rope.freq_base", math.inf, None),
            ("llama.rope.freq_base", "big", None),
            ("llama.rope.scaling.type", "yarn", None), ("llama.rope.scaling.type", 1, None),
            ("general.architecture", "gpt2", None), ("general.architecture", 5, None),
            ("general.architecture", "", None),
            ("tokenizer.ggml.model", "bert", None), ("tokenizer.ggml.model", 5, None),
            ("tokenizer.ggml.tokens", Arr(UINT32, list(range(270))), None),
            ("tokenizer.ggml.tokens", Arr(ARRAY, [Arr(UINT16, [i]) for i in range(270)]), None),
            ("tokenizer.ggml.tokens", "abc", None), ("tokenizer.ggml.tokens", Arr(STRING, []),
                                                     None),
            ("tokenizer.ggml.tokens", Arr(STRING, self.tiny.tokens[:-1]), None),
            ("tokenizer.ggml.tokens", Arr(STRING, self.tiny.tokens + ["extra"]), None),
            ("tokenizer.ggml.tokens", Arr(STRING, ["a"] * 270), None),
            ("tokenizer.ggml.token_type", Arr(INT32, [1] * 269), None),
            ("tokenizer.ggml.token_type", 1, None),
            ("tokenizer.ggml.merges", "a b", None),
        ]
        for key, value, vtype in wrong:
            name = "key-%s=%s" % (key.split(".", 1)[1], short(value))
            self.metadata(name, key, value, vtype)
        # tolerated oddities: llama.cpp-like leniency is fine, a crash is not
        for key, value in (("tokenizer.ggml.token_type", Arr(STRING, ["1"] * 270)),
                           ("tokenizer.ggml.merges", Arr(UINT32, [1, 2, 3]))):
            self.metadata("odd-%s=%s" % (key.split(".", 1)[1], short(value)), key, value,
                          level=ANY)
        self.rewritten("odd-bos-out-of-range-but-added", ANY, lambda w: (
            w.set("tokenizer.ggml.add_bos_token", True),
            w.set("tokenizer.ggml.bos_token_id", 100000)) and None)
        self.rewritten("rope-linear-factor-0", MODEL, lambda w: (
            w.set("llama.rope.scaling.type", "linear"),
            w.set("llama.rope.scaling.factor", 0.0)) and None)
        self.rewritten("odd-rope-linear-factor-negative", ANY, lambda w: (
            w.set("llama.rope.scaling.type", "linear"),
            w.set("llama.rope.scaling.factor", -2.0)) and None)

        # model level: tensor shapes and extra tensors
        def reshape(name, shape, t=None):
            def edit(w):
                spec = w.tensor(name)
                spec[1] = gw.type_id(t) if t else spec[1]
                spec[2] = shape
                spec[3] = bytes(gw.tensor_nbytes(spec[1], shape))
            return edit
        for name, shape, t in (("token_embd.weight", (64 * 270,), None),
                               ("token_embd.weight", (64, 270, 1), None),
                               ("token_embd.weight", (64, 269), None),
                               ("token_embd.weight", (32, 540), None),
                               ("blk.0.attn_norm.weight", (64, 1), None),
                               ("blk.0.attn_norm.weight", (32,), None),
                               ("output_norm.weight", (128,), None),
                               ("blk.1.ffn_up.weight", (64, 96), None),
                               ("blk.1.attn_k.weight", (64, 64), None),
                               ("blk.0.attn_q.weight", (64, 64, 1), None),
                               ("blk.0.attn_q.weight", (64, 32, 2), None)):
            self.rewritten("shape-%s-%s" % (name, "x".join(map(str, shape))), MODEL,
                           reshape(name, shape, t))
        extra = [("blk.2.attn_q.weight", "Q8_0", (64, 64)), ("output.weight", "Q8_0", (64, 269)),
                 ("output.weight", "F32", (32, 270)), ("rope_freqs.weight", "F32", (7,)),
                 ("rope_freqs.weight", "F32", (16, 2))]
        for name, t, shape in extra:
            self.rewritten("extra-%s-%s" % (name, "x".join(map(str, shape))), MODEL,
                           lambda w, n=name, t=t, s=shape: w.add_tensor(
                               n, t, s, bytes(gw.tensor_nbytes(t, s))) and None)


def short(value):
    if isinstance(value, Arr):
        return "array-of-%d-%s" % (len(value.items), gw.VALUE_TYPE_NAMES[value.elem_type])
    text = repr(value)
    return text if len(text) < 20 else text[:17] + "..."


CORPUS = None


def corpus():
    global CORPUS
    if CORPUS is None:
        directory = tempfile.mkdtemp(prefix="corpus-", dir=TMP)
        CORPUS = Corpus(directory)
    return CORPUS


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class TestMalformedInProcess(unittest.TestCase):
    """GGUFFile and Model raise PicoError, with a one-line message, on every broken file."""

    def test_base_file_is_valid(self):
        c = corpus()
        with picolm.Model(c.base_path) as model:
            self.assertEqual(model.config.n_layer, 2)
            self.assertEqual(model.config.n_vocab, 270)

    def test_corpus(self):
        c = corpus()
        self.assertGreater(len(c.cases), 150)
        fds = open_fds()
        for name, level, path in c.cases:
            with self.subTest(case=name):
                for what, load in (("GGUFFile", picolm.GGUFFile), ("Model", picolm.Model)):
                    if level == ANY and what == "Model":
                        try:
                            with limited():
                                load(path).close()
                        except picolm.PicoError as e:
                            self.assertIsNone(message_problem(e), "%s: %s" % (what, e))
                        continue
                    if what == "GGUFFile" and level != FILE:
                        with limited():
                            picolm.GGUFFile(path).close()  # must load: only Model refuses
                        continue
                    try:
                        with limited():
                            load(path).close()
                    except picolm.PicoError as e:
                        self.assertIsNone(message_problem(e), "%s: %s" % (what, e))
                    except BaseException as e:  # anything else is a bug
                        if isinstance(e, KeyboardInterrupt):
                            raise
                        self.fail("%s raised %s: %s" % (what, type(e).__name__,
                                                        str(e)[:300]))
                    else:
                        self.fail("%s accepted the file" % what)
        self.assertEqual(open_fds(), fds, "file descriptors leaked")

    def test_every_truncation_of_a_small_file(self):
        w, _, _ = small_file_writer()
        built = w.build()
        data = built.bytes()
        end = max(f.offset + f.size for k, f in built.fields.items() if k.startswith("data:"))
        path = os.path.join(TMP, "cut.gguf")
        failures = []
        for length in range(end):
            with open(path, "wb") as f:
                f.write(data[:length])
            try:
                with limited():
                    picolm.GGUFFile(path).close()
            except picolm.PicoError as e:
                if message_problem(e):
                    failures.append((length, message_problem(e)))
            except Exception as e:
                failures.append((length, "%s: %s" % (type(e).__name__, e)))
            else:
                failures.append((length, "accepted"))
        self.assertEqual(failures, [])

    def test_truncations_of_a_model(self):
        c = corpus()
        data = c.base.bytes()
        fields = c.base.fields
        end = max(f.offset + f.size for k, f in fields.items() if k.startswith("data:"))
        lengths = set(range(0, end, 331))
        for label, f in fields.items():  # around the start of every field
            if not label.startswith("data"):
                lengths.update((f.offset - 1, f.offset + 1))
        lengths = sorted(n for n in lengths if 0 <= n < end)
        path = os.path.join(TMP, "cut-model.gguf")
        failures = []
        for length in lengths:
            with open(path, "wb") as f:
                f.write(data[:length])
            try:
                with limited():
                    picolm.Model(path).close()
            except picolm.PicoError as e:
                if message_problem(e):
                    failures.append((length, message_problem(e)))
            except Exception as e:
                failures.append((length, "%s: %s" % (type(e).__name__, e)))
            else:
                failures.append((length, "accepted"))
        self.assertGreater(len(lengths), 500)
        self.assertEqual(failures, [])


class TestMessages(unittest.TestCase):
    def test_big_endian_is_named(self):
        """A big-endian file (version bytes 00 00 00 03) is reported as big-endian."""
        for name in ("big-endian", "big-endian-v2"):
            path = [case[2] for case in corpus().cases if case[0] == name][0]
            with self.subTest(case=name):
                with self.assertRaises(picolm.PicoError) as caught:
                    picolm.GGUFFile(path)
                self.assertIn("big-endian", str(caught.exception))


# one case of each kind, run through a real `python3 picolm.py` (the rest through run_main_forked)
REAL_CLI_SAMPLE = (
    "directory", "missing", "empty", "bad-magic", "version-4", "big-endian",
    "value-type-13", "nested-1000-deep", "duplicate-key", "alignment-3-u32", "n_dims-1000",
    "tensor-type-1000", "offset-18881", "overlap-partial", "data-cut-1-byte-short",
    "no-tensor-blk.1.ffn_down.weight", "no-key-tokenizer.ggml.tokens",
    "key-feed_forward_length=64",
)


def run_cli_all(paths, memory=None):
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda path: run_cli(path, memory=memory), paths))


class TestMalformedCLI(unittest.TestCase):
    """`picolm.py FILE -p hi -n 1`: one line on stderr, exit status 2, every broken file."""

    def check(self, name, level, path, result):
        with self.subTest(case=name):
            if level == ANY and result[0] == 0:
                self.assertNotIn("Traceback", result[2])
                return
            self.assertIsNone(cli_error_problem(path, result))

    def test_corpus(self):
        """Every case through the command line's main(), each in a forked process."""
        cases = corpus().cases
        for case, result in zip(cases, run_main_forked([case[2] for case in cases])):
            self.check(*case, result)

    def test_corpus_sample_real_cli(self):
        cases = [case for case in corpus().cases if case[0] in REAL_CLI_SAMPLE]
        self.assertEqual(len(cases), len(REAL_CLI_SAMPLE))
        for case, result in zip(cases, run_cli_all([case[2] for case in cases])):
            self.check(*case, result)

    def test_truncations(self):
        c = corpus()
        data = c.base.bytes()
        fields = c.base.fields
        cuts = [5, 20, 24, 30, fields["kv:general.architecture.value"].offset + 3,
                fields["kv:llama.block_count.value"].offset + 2,
                fields["kv:llama.rope.freq_base.value"].offset + 1,
                fields["kv:tokenizer.ggml.add_bos_token.value"].offset,
                fields["kv:tokenizer.ggml.tokens.count"].offset + 4,
                fields["kv:tokenizer.ggml.tokens.value"].offset + 1000,
                fields["kv:tokenizer.ggml.token_type.value"].offset + 30,
                fields["tensor_info"].offset + 40, fields["data"].offset - 1,
                fields["data"].offset + 100, len(data) // 2, len(data) - 100]
        paths = []
        for n in cuts:
            paths.append(os.path.join(TMP, "cli-cut-%d.gguf" % n))
            with open(paths[-1], "wb") as f:
                f.write(data[:n])
        for n, path, result in zip(cuts, paths, run_main_forked(paths)):
            self.check("cut-%d" % n, FILE, path, result)
        real = paths[::4]
        for n, path, result in zip(cuts[::4], real, run_cli_all(real)):
            self.check("real-cli-cut-%d" % n, FILE, path, result)

    def test_huge_claims_need_no_memory(self):
        """Under a 1 GB address-space limit, files claiming 2^40-element arrays (and other
        absurd sizes) fail fast and cleanly: nothing is allocated for what is not there."""
        wanted = ("u8-array-2^40", "f64-array-2^61", "nested-array-count-2^40",
                  "string-array-count-1099511627776", "i32-array-count-1099511627776",
                  "n_kv-9223372036854775808", "n_tensors-18446744073709551615",
                  "string-length-18446744073709551615", "dims-product-wraps-2^64",
                  "key-embedding_length=1099511627776")
        cases = [case for case in corpus().cases if case[0] in wanted]
        self.assertEqual(len(cases), len(wanted))
        results = run_cli_all([case[2] for case in cases], memory=GB)
        for (name, _, path), result in zip(cases, results):
            with self.subTest(case=name):
                self.assertIsNone(cli_error_problem(path, result))
                self.assertLess(result[3], 10.0)


class TestValidCLI(unittest.TestCase):
    def test_tiny_model_generates(self):
        path = os.path.join(TMP, "cli-tiny.gguf")
        gw.make_tiny_llama(path, "Q8_0", seed=11)
        outputs = []
        for threads in ("1", "2"):
            rc, out, err, _ = run_cli(path, ("-p", "Hello world", "-t", "0", "-n", "5",
                                             "-j", threads))
            with self.subTest(threads=threads):
                self.assertEqual(rc, 0, err[-2000:])
                self.assertNotIn("Traceback", err)
                self.assertTrue(out.endswith("\n"), repr(out))
                self.assertTrue(out.strip("\n"), "no text generated")
            outputs.append(out)
        self.assertEqual(outputs[0], outputs[1], "-j 2 generated other text than -j 1")


if __name__ == "__main__":
    unittest.main()
