"""picolm_kernels: loader and ctypes wrappers of picolm's optional C accelerator.

    lib = picolm_kernels.load()        # a ctypes.CDLL, or None
    if lib is None:
        print(picolm_kernels.reason)   # one line saying why

The library is built by tools/build_accel.py from picolm_kernels.c (next to this file) as
picolm_kernels.<system>-<arch>.<so|dylib|dll>. It is loaded only when the SHA-256 of the C
source compiled into it equals that of the C file here, and when this CPU runs the ISA it
was built for (an AVX2 build needs avx2, fma and f16c). Stdlib only.
"""

import array
import ctypes
import hashlib
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "picolm_kernels.c")
API_VERSION = 1

# the ggml type ids the kernels know
TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
         "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20,
         "IQ4_XS": 23, "BF16": 30}

reason = "not loaded yet"
_cache = {}


# ----------------------------------------------------------------------------
# Where the library is and what it must match

def source_hash(path=None):
    with open(path or SOURCE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def normalize_arch(name):
    """x86_64, x86, aarch64, arm, riscv64, ... from a machine name or a target triple."""
    name = name.lower().split("-")[0]
    if name in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if name in ("i386", "i486", "i586", "i686", "x86"):
        return "x86"
    if name in ("aarch64", "arm64", "armv8l") or name.startswith("aarch64"):
        return "aarch64"
    if name.startswith("arm"):
        return "arm"
    return name


def normalize_system(name):
    name = name.lower()
    if "linux" in name:
        return "linux"
    if "darwin" in name or "apple" in name or "macos" in name:
        return "darwin"
    if "win" in name or "mingw" in name or "cygwin" in name or "msys" in name:
        return "windows"
    if "freebsd" in name:
        return "freebsd"
    return name.split("-")[0] or "unknown"


def host_arch():
    return normalize_arch(platform.machine() or "unknown")


def host_system():
    return normalize_system(sys.platform)


def library_name(system=None, arch=None):
    system = system or host_system()
    arch = arch or host_arch()
    ext = {"darwin": ".dylib", "windows": ".dll"}.get(system, ".so")
    return "picolm_kernels.%s-%s%s" % (system, arch, ext)


def library_path(system=None, arch=None):
    return os.path.join(HERE, library_name(system, arch))


def cpu_flags():
    """The CPU's feature flags as a set of lower-case names, or None if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = set()
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags.update(value.split())
            if flags:
                return flags
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features",
                                  "machdep.cpu.leaf7_features"],
                                 capture_output=True, text=True, timeout=5).stdout
            flags = set(out.lower().split())
            return flags or None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def isa_supported(isa, flags=None, arch=None):
    """(True, "") if this CPU runs code built for `isa`, else (False, why)."""
    arch = arch or host_arch()
    if isa == "scalar":
        return True, ""
    if isa in ("avx2", "sse2"):
        if arch != "x86_64" and arch != "x86":
            return False, "library built for x86 (%s), this CPU is %s" % (isa, arch)
        if isa == "sse2" and arch == "x86_64":
            return True, ""
        flags = cpu_flags() if flags is None else flags
        if flags is None:
            return False, "cannot tell whether this CPU has %s" % isa
        need = {"avx2": ("avx2", "fma", "f16c"), "sse2": ("sse2",)}[isa]
        missing = [f for f in need if f not in flags]
        if missing:
            return False, "library built for %s, this CPU lacks %s" % (isa, ", ".join(missing))
        return True, ""
    if isa == "neon":
        if arch == "aarch64":
            return True, ""
        if arch == "arm":
            flags = cpu_flags() if flags is None else flags
            if flags is not None and ("neon" in flags or "asimd" in flags):
                return True, ""
            return False, "library built for NEON, this CPU does not report neon"
        return False, "library built for ARM NEON, this CPU is %s" % arch
    return False, "library built for unknown ISA %r" % isa


# ----------------------------------------------------------------------------
# Loading

def _declare(lib):
    c = ctypes
    p, i32, i64 = c.c_void_p, c.c_int, c.c_int64
    sig = {
        "pk_source_hash": (c.c_char_p, []),
        "pk_isa": (c.c_char_p, []),
        "pk_version": (i32, []),
        "pk_type_block_size": (i32, [i32]),
        "pk_type_block_bytes": (i32, [i32]),
        "pk_type_has_qa": (i32, [i32]),
        "pk_dequantize": (i32, [i32, p, p, i64]),
        "pk_quantize_act": (i32, [p, i64, p, p, p]),
        "pk_pool_new": (p, [i32]),
        "pk_pool_free": (None, [p]),
        "pk_pool_threads": (i32, [p]),
        "pk_matmul": (i32, [p, i32, p, i64, i64, p, i32, p, i32]),
        "pk_matvec": (i32, [p, i32, p, i64, i64, p, p, i32]),
        "pk_model_new": (p, [c.c_char_p, p, i32, p, i32, p, p, p, p, p, i32, i32, i32,
                             c.c_char_p, i32]),
        "pk_model_free": (None, [p]),
        "pk_model_threads": (i32, [p]),
        "pk_forward": (i32, [p, p, i32, i32, p, i64, p, i32]),
        "pk_top": (i64, [p, i64, i64, p]),
        "pk_f32_to_f16": (None, [p, p, i64]),
        "pk_profile": (None, [i32, p]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def load(path=None):
    """The library as a ctypes.CDLL with argtypes declared, or None (see `reason`)."""
    global reason
    path = path or library_path()
    if path in _cache:
        lib, reason = _cache[path]
        return lib
    lib, why = _load(path)
    _cache[path] = (lib, why)
    reason = why
    return lib


def load_or_build(build=True, quiet=True):
    """load(); when the library is missing or stale and `build` is true, builds it once with
    tools/build_accel.py (which must sit beside this package) and loads that. Returns the
    library or None (see `reason`; a failed build is one line on stderr)."""
    global reason
    lib = load()
    if lib is not None or not build:
        return lib
    if not (reason.startswith("no accelerator library") or "another version" in reason
            or "API version" in reason or "lacks a function" in reason):
        return None
    tool = os.path.join(os.path.dirname(HERE), "tools", "build_accel.py")
    if not os.path.exists(tool):
        return None
    import importlib.util
    spec = importlib.util.spec_from_file_location("picolm_build_accel", tool)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        path = module.build(quiet=quiet)
    except Exception as e:  # a broken tool must not stop the engine
        reason = "building the accelerator failed: %s" % e
        return None
    if path is None:
        reason = "building the accelerator failed (see above)"
        return None
    forget()
    return load(path)


def forget():
    """Forgets cached load results (after a rebuild)."""
    _cache.clear()


def _load(path):
    if not os.path.exists(path):
        return None, "no accelerator library %s (build it with tools/build_accel.py)" % (
            os.path.relpath(path))
    try:
        want = source_hash()
    except OSError as e:
        return None, "cannot read the accelerator source: %s" % (e.strerror or e)
    isa = _peek(path, b"PK-ISA:")
    if isa is not None:
        ok, why = isa_supported(isa)
        if not ok:
            return None, why
    stale = "%s was built from another version of picolm_kernels.c; rebuild it" % (
        os.path.basename(path))
    built_from = _peek(path, b"PK-HASH:")
    if built_from is not None and built_from != want:
        return None, stale
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, "cannot load %s: %s" % (os.path.basename(path), str(e).splitlines()[0])
    try:
        _declare(lib)
    except AttributeError as e:
        return None, "%s lacks a function (%s); rebuild it" % (os.path.basename(path), e)
    if lib.pk_version() != API_VERSION:
        return None, "%s has API version %d, expected %d; rebuild it" % (
            os.path.basename(path), lib.pk_version(), API_VERSION)
    if lib.pk_source_hash().decode("ascii", "replace") != want:
        return None, stale
    isa = lib.pk_isa().decode("ascii", "replace")
    ok, why = isa_supported(isa)
    if not ok:
        return None, why
    return lib, ""


def _peek(path, marker):
    """The string after `marker` compiled into the library (its ISA, its source hash), read
    from the file's bytes without loading it: an AVX2 build is never even initialised on a
    CPU without AVX2, and a stale one is never mapped; None if not found."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    at = data.find(marker)
    if at < 0:
        return None
    end = data.find(b"\0", at)
    return data[at + len(marker):end].decode("ascii", "replace")


# ----------------------------------------------------------------------------
# Kernels from Python (tests, tools)

def _address(buf):
    """(address, keep-alive) of a bytes-like object; read-only buffers are copied once."""
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value, buf
    try:
        obj = (ctypes.c_char * len(memoryview(buf).cast("B"))).from_buffer(buf)
    except (TypeError, ValueError, BufferError):
        data = bytes(buf)
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value, data
    return ctypes.addressof(obj), obj


def _floats(values):
    arr = values if isinstance(values, array.array) and values.typecode == "f" else array.array("f", values)
    addr, _ = arr.buffer_info()
    return arr, addr


class Pool:
    """A persistent pool of `threads` threads (the caller's included)."""

    def __init__(self, lib, threads):
        self.lib = lib
        self.handle = lib.pk_pool_new(int(threads))
        if not self.handle:
            raise MemoryError("cannot start %d threads" % threads)

    @property
    def threads(self):
        return self.lib.pk_pool_threads(self.handle)

    def close(self):
        if self.handle:
            self.lib.pk_pool_free(self.handle)
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def dequantize(lib, ggml_type, data, n):
    """n floats (array 'f') of a row of `data` (bytes-like) of type ggml_type."""
    out = array.array("f", bytes(4 * n))
    addr, keep = _address(data)
    if lib.pk_dequantize(ggml_type, addr, out.buffer_info()[0], n) != 0:
        raise ValueError("cannot dequantize type %d, n %d" % (ggml_type, n))
    del keep
    return out


def matmul(lib, ggml_type, data, n_cols, n_rows, x, n_tok=1, quantize=False, pool=None):
    """y[t * n_rows + r] = row r . x[t * n_cols:]; array 'f' of n_tok * n_rows."""
    xa, xaddr = _floats(x)
    if len(xa) != n_cols * n_tok:
        raise ValueError("x has %d values, expected %d" % (len(xa), n_cols * n_tok))
    out = array.array("f", bytes(4 * n_rows * n_tok))
    addr, keep = _address(data)
    rc = lib.pk_matmul(pool.handle if pool else None, ggml_type, addr, n_cols, n_rows, xaddr,
                       n_tok, out.buffer_info()[0], 1 if quantize else 0)
    del keep
    if rc != 0:
        raise ValueError("pk_matmul failed (%d)" % rc)
    return out


def quantize_act(lib, x):
    """(q array 'h', d array, s array) of x quantized as the integer kernels do it."""
    xa, xaddr = _floats(x)
    n = len(xa)
    q = array.array("h", bytes(2 * n))
    d = array.array("f", bytes(4 * (n // 32)))
    s = array.array("f", bytes(4 * (n // 32)))
    if lib.pk_quantize_act(xaddr, n, q.buffer_info()[0], d.buffer_info()[0],
                           s.buffer_info()[0]) != 0:
        raise ValueError("n must be a positive multiple of 32")
    return q, d, s


# ----------------------------------------------------------------------------
# The whole forward pass

LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down")


def gguf_tensor_table(gguf_file):
    """{name: (absolute file offset, ggml type, shape)} of a picolm.GGUFFile."""
    return {name: (gguf_file.data_start + t.offset, t.type, tuple(t.shape))
            for name, t in gguf_file.tensors.items()}


def _get(config, name, default=None):
    if isinstance(config, dict):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    if value is None:
        raise ValueError("config lacks %r" % name)
    return value


class AcceleratedModel:
    """One LLaMA-family model evaluated by the C forward pass.

    path: the GGUF file (mapped read-only by the C side; the weights are used in place).
    config: an object or dict with n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim,
        n_vocab, rope_dim, rope_pairing ("norm" or "neox"), rope_base, rope_scale, norm_eps.
    tensors: {name: (absolute file offset, ggml type, shape)} (see gguf_tensor_table).
    kv: a writable buffer (the KVCache's anonymous mmap) of 2 * n_layer * n_ctx * kv_dim
        FP16 values, laid out [layer][K, V][position][n_head_kv * head_dim]. It stays
        exported while this object lives: close() this before closing the cache.
    """

    def __init__(self, lib, path, config, tensors, n_ctx, kv, threads=1, max_batch=64,
                 freq_factors=None):
        self.lib = lib
        self.handle = None
        self._kv_obj = None
        self.n_ctx = int(n_ctx)
        self.n_vocab = int(_get(config, "n_vocab"))
        n_layer = int(_get(config, "n_layer"))
        kv_dim = int(_get(config, "n_head_kv")) * int(_get(config, "head_dim"))
        pairing = _get(config, "rope_pairing", "norm")
        hp = [n_layer, _get(config, "n_embd"), _get(config, "n_ff"), _get(config, "n_head"),
              _get(config, "n_head_kv"), _get(config, "head_dim"), self.n_vocab, self.n_ctx,
              _get(config, "rope_dim"), 1 if pairing == "neox" else 0]
        fp = [_get(config, "rope_base"), _get(config, "rope_scale", 1.0), _get(config, "norm_eps")]
        names = ["token_embd.weight", "output_norm.weight",
                 "output.weight" if "output.weight" in tensors else "token_embd.weight"]
        for i in range(n_layer):
            names.extend("blk.%d.%s.weight" % (i, t) for t in LAYER_TENSORS)
        for name in names:
            if name not in tensors:
                raise ValueError("missing tensor %r" % name)
        n = len(names)
        offsets = (ctypes.c_int64 * n)(*[tensors[k][0] for k in names])
        types = (ctypes.c_int32 * n)(*[tensors[k][1] for k in names])
        ne0 = (ctypes.c_int64 * n)(*[tensors[k][2][0] for k in names])
        ne1 = (ctypes.c_int64 * n)(*[_rows(tensors[k][2]) for k in names])
        hp_arr = (ctypes.c_int64 * len(hp))(*[int(v) for v in hp])
        fp_arr = (ctypes.c_double * len(fp))(*[float(v) for v in fp])
        ff = None
        if freq_factors is not None:
            ff = (ctypes.c_float * len(freq_factors))(*freq_factors)
        err = ctypes.create_string_buffer(256)
        handle = lib.pk_model_new(os.fsencode(path), hp_arr, len(hp), fp_arr, len(fp), ff,
                                  offsets, types, ne0, ne1, n, int(threads), int(max_batch),
                                  err, len(err))
        if not handle:
            raise ValueError("accelerator: " + err.value.decode("utf-8", "replace"))
        self.handle = handle
        self.kv_bytes = 2 * n_layer * self.n_ctx * kv_dim * 2
        if len(memoryview(kv).cast("B")) < self.kv_bytes:
            self.close()
            raise ValueError("the KV buffer is smaller than %d bytes" % self.kv_bytes)
        self._kv_obj = (ctypes.c_char * self.kv_bytes).from_buffer(kv)
        self._kv_addr = ctypes.addressof(self._kv_obj)
        self.logits = (ctypes.c_float * self.n_vocab)()
        self._logits_addr = ctypes.addressof(self.logits)
        self._tok_cap = 0
        self._tok = None

    @property
    def threads(self):
        return self.lib.pk_model_threads(self.handle)

    def _tokens(self, tokens):
        n = len(tokens)
        if n > self._tok_cap:
            self._tok_cap = max(n, 64)
            self._tok = (ctypes.c_int32 * self._tok_cap)()
        self._tok[:n] = tokens
        return n

    def _check(self, rc, tokens, pos):
        if rc == -2:
            raise ValueError("a token id is outside the vocabulary")
        if rc != 0:
            raise ValueError("cannot evaluate %d tokens at position %d (context %d)"
                             % (len(tokens), pos, self.n_ctx))

    def forward(self, tokens, pos, want_logits=True):
        """Evaluates tokens at positions pos, pos+1, ...; the last one's logits (a list of
        floats) if want_logits, else None."""
        if isinstance(tokens, int):
            tokens = [tokens]
        n = self._tokens(tokens)
        rc = self.lib.pk_forward(self.handle, self._tok, n, pos, self._kv_addr, self.kv_bytes,
                                 self._logits_addr if want_logits else None,
                                 1 if want_logits else 0)
        self._check(rc, tokens, pos)
        if not want_logits:
            return None
        return memoryview(self.logits).cast("B").cast("f").tolist()

    def forward_argmax(self, tokens, pos):
        """forward() for greedy decoding: the index of the last token's largest logit (the
        logits stay available through top() and logits_array())."""
        n = self._tokens(tokens)
        rc = self.lib.pk_forward(self.handle, self._tok, n, pos, self._kv_addr, self.kv_bytes,
                                 self._logits_addr, 1)
        self._check(rc, tokens, pos)
        return self.argmax()

    def forward_all(self, tokens, pos):
        """Every token's logits: an array('f') of len(tokens) * n_vocab."""
        n = self._tokens(tokens)
        out = array.array("f", bytes(4 * n * self.n_vocab))
        rc = self.lib.pk_forward(self.handle, self._tok, n, pos, self._kv_addr, self.kv_bytes,
                                 out.buffer_info()[0], 2)
        self._check(rc, tokens, pos)
        return out

    def argmax(self):
        """Index of the largest logit of the last forward(..., want_logits=True) (first on
        ties, like max() over the list): greedy decoding without the ~2 ms a Python argmax
        over 49152 floats costs."""
        return self.top(1)[0]

    def top(self, k):
        """The ids of the last logits' k largest, largest first (lower id first on ties)."""
        ids = (ctypes.c_int64 * k)()
        return ids[:self.lib.pk_top(self._logits_addr, self.n_vocab, k, ids)]

    def logits_array(self):
        """The last logits as an array('f') (a memcpy; a list costs ~0.5 ms more)."""
        out = array.array("f")
        out.frombytes(memoryview(self.logits).cast("B"))
        return out

    def close(self):
        if self.handle:
            self.lib.pk_model_free(self.handle)
            self.handle = None
        self._kv_obj = None  # releases the export of the KV buffer

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _rows(shape):
    n = 1
    for d in shape[1:]:
        n *= d
    return n
