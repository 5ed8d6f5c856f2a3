"""A small GGUF writer (and an independent reader) for picolm's tests.

No third-party package: the format is written field by field with `struct`.

    w = GGUFWriter(version=3, alignment=64)
    w.add("general.architecture", "llama")
    w.add("some.u8", 7, UINT8)
    w.add("nested", Arr(ARRAY, [Arr(UINT8, [1, 2]), Arr(STRING, ["a"])]))
    w.add_tensor("t", GGML_F32, (4, 2), struct.pack("<8f", *range(8)))
    built = w.build()             # Built: .buf (bytearray) and .fields (label -> Field)
    built.patch("n_kv", 2 ** 63)  # corrupt one field, written with its own format
    built.write(path)

Field labels: "magic", "version", "n_tensors", "n_kv"; per key K: "kv:K" (the whole
entry), "kv:K.key_len", "kv:K.type", "kv:K.value" (the value's bytes), "kv:K.len" (a
string value's length), "kv:K.elem_type", "kv:K.count" (an array's); per tensor N:
"tensor:N" (its info), "tensor:N.name_len", "tensor:N.n_dims", "tensor:N.dim0".., 
"tensor:N.type", "tensor:N.offset", "data:N" (its bytes); sections "header", "kv",
"tensor_info", "data".

Quantized blocks (layouts of llama.cpp's ggml/src/ggml-common.h, decoding as
ggml-quants.c's dequantize_row_*): `random_tensor(type, n, rng, scale)` returns the bytes of
random but valid blocks and the floats they hold (our own decoder, `dequantize`);
`quantize(type, floats)` encodes given values for F32, F16, BF16, Q8_0, Q4_0 and Q4_1.

`make_tiny_llama(path, ...)` writes a random tiny llama model with a gpt2 byte-level BPE
vocabulary, and returns what it wrote (weights as floats included).
"""

import copy
import functools
import os
import random
import re
import struct
import tempfile
from collections import namedtuple

def fast_tmpdir(prefix):
    """A temporary directory, in RAM (/dev/shm) where there is one: tests write many files."""
    shm = "/dev/shm"
    use = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=use)


# ---------------------------------------------------------------------------
# GGUF value types

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, \
    FLOAT64 = range(13)
SCALAR_CODES = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i",
                FLOAT32: "f", BOOL: "?", UINT64: "Q", INT64: "q", FLOAT64: "d"}
VALUE_TYPE_NAMES = {UINT8: "u8", INT8: "i8", UINT16: "u16", INT16: "i16", UINT32: "u32",
                    INT32: "i32", FLOAT32: "f32", BOOL: "bool", STRING: "string",
                    ARRAY: "array", UINT64: "u64", INT64: "i64", FLOAT64: "f64"}

# ggml tensor types
GGML_TYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21,
    "IQ2_S": 22, "IQ4_XS": 23, "I8": 24, "I16": 25, "I32": 26, "I64": 27, "F64": 28,
    "IQ1_M": 29, "BF16": 30,
}
GGML_F32, GGML_F16 = 0, 1
# name -> (block_size, block_bytes) for the types this module can generate
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
}
TYPE_NAMES = {v: k for k, v in GGML_TYPES.items()}


def type_id(t):
    return GGML_TYPES[t] if isinstance(t, str) else t


def type_name(t):
    return t if isinstance(t, str) else TYPE_NAMES[t]


def tensor_nbytes(t, shape):
    block_size, block_bytes = BLOCKS[type_name(t)]
    n = 1
    for d in shape:
        n *= d
    assert shape[0] % block_size == 0, (t, shape)
    return n // block_size * block_bytes


class Arr:
    """An array value with an explicit element type (items are Arr for ARRAY)."""

    def __init__(self, elem_type, items):
        self.elem_type, self.items = elem_type, list(items)


class Typed:
    """A value with an explicit GGUF value type."""

    def __init__(self, vtype, value):
        self.vtype, self.value = vtype, value


class Raw:
    """Bytes written verbatim after the key's type field (for unknown or broken values)."""

    def __init__(self, vtype, data):
        self.vtype, self.data = vtype, bytes(data)


def infer_type(value):
    if isinstance(value, (Typed, Raw)):
        return value.vtype
    if isinstance(value, Arr):
        return ARRAY
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return UINT32
        if -(1 << 31) <= value < 0:
            return INT32
        return UINT64 if value >= 0 else INT64
    if isinstance(value, float):
        return FLOAT32
    if isinstance(value, str):
        return STRING
    if isinstance(value, (list, tuple)):
        return ARRAY
    raise TypeError("cannot infer a GGUF type for %r" % (value,))


def as_array(value):
    if isinstance(value, Arr):
        return value
    if isinstance(value, Typed):
        value = value.value
        if isinstance(value, Arr):
            return value
    items = list(value)
    elem = infer_type(items[0]) if items else INT32
    if elem == UINT32 and any(isinstance(v, int) and v < 0 for v in items):
        elem = INT32
    return Arr(elem, items)


Field = namedtuple("Field", "offset size fmt")


class Built:
    """Bytes of a GGUF file and where each field sits, for reading back or corrupting."""

    def __init__(self, buf, fields, endian="<"):
        self.buf, self.fields, self.endian = buf, fields, endian

    def field(self, label):
        return self.fields[label]

    def patch(self, label, value):
        """Overwrites a numeric field with `value`, in the field's own format."""
        f = self.fields[label]
        struct.pack_into(self.endian + f.fmt, self.buf, f.offset, value)
        return self

    def patch_bytes(self, offset, data):
        self.buf[offset:offset + len(data)] = data
        return self

    def truncated(self, length):
        return bytes(self.buf[:length])

    def bytes(self):
        return bytes(self.buf)

    def write(self, path):
        with open(path, "wb") as f:
            f.write(self.buf)
        return path


class GGUFWriter:
    """Builds a GGUF v2/v3 file. Keys keep their order; duplicates are allowed (on purpose).

    alignment: written as general.alignment (u32) when given, and used for the layout.
    layout_alignment: overrides the alignment the data is actually laid out with.
    endian: "<" (normal) or ">" (every header number big-endian, as a big-endian file).
    """

    def __init__(self, version=3, alignment=None, layout_alignment=None, endian="<"):
        self.version, self.endian = version, endian
        self.kv = []
        self.tensors = []
        self.alignment = alignment
        if alignment is not None:
            self.kv.append(("general.alignment", Typed(UINT32, alignment)))
        self.layout_alignment = layout_alignment or (alignment if alignment else 32)

    def add(self, key, value, vtype=None):
        if vtype is not None and not isinstance(value, (Typed, Raw)):
            value = Typed(vtype, value)
        self.kv.append((key, value))
        return self

    def remove(self, key):
        self.kv = [(k, v) for k, v in self.kv if k != key]

    def set(self, key, value, vtype=None):
        """Replaces a key's value in place (or appends it); value None removes the key."""
        if value is None:
            self.remove(key)
            return self
        if vtype is not None and not isinstance(value, (Typed, Raw)):
            value = Typed(vtype, value)
        for i, (k, _) in enumerate(self.kv):
            if k == key:
                self.kv[i] = (key, value)
                return self
        return self.add(key, value)

    def clone(self):
        return copy.deepcopy(self)

    def remove_tensor(self, name):
        self.tensors = [t for t in self.tensors if t[0] != name]
        return self

    def tensor(self, name):
        """The mutable spec [name, type id, shape, data, offset] of a tensor."""
        for spec in self.tensors:
            if spec[0] == name:
                return spec
        raise KeyError(name)

    def add_tensor(self, name, ggml_type, shape, data, offset=None):
        """shape is ne[0] (row length) first; offset None = the next aligned place."""
        self.tensors.append([name, type_id(ggml_type), tuple(shape), bytes(data), offset])
        return self

    # -- serialisation -------------------------------------------------------
    def _pack(self, out, fields, label, fmt, value):
        if label is not None:
            fields[label] = Field(len(out), struct.calcsize("<" + fmt), fmt)
        out += struct.pack(self.endian + fmt, value)

    def _string(self, out, fields, label, text):
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        self._pack(out, fields, label, "Q", len(raw))
        out += raw

    def _value(self, out, fields, label, vtype, value):
        if isinstance(value, Raw):
            out += value.data
            return
        if isinstance(value, Typed):
            value = value.value
        if vtype in SCALAR_CODES:
            self._pack(out, fields, None, SCALAR_CODES[vtype], value)
        elif vtype == STRING:
            self._string(out, fields, label and label + ".len", value)
        elif vtype == ARRAY:
            arr = as_array(value)
            self._pack(out, fields, label and label + ".elem_type", "I", arr.elem_type)
            self._pack(out, fields, label and label + ".count", "Q", len(arr.items))
            if arr.elem_type in SCALAR_CODES:
                out += struct.pack("%s%d%s" % (self.endian, len(arr.items),
                                               SCALAR_CODES[arr.elem_type]), *arr.items)
            else:
                for item in arr.items:
                    self._value(out, fields, None, arr.elem_type, item)
        else:
            raise ValueError("cannot write value type %r without Raw" % vtype)

    def build(self):
        out, fields = bytearray(), {}
        fields["magic"] = Field(0, 4, "4s")
        out += b"GGUF"
        self._pack(out, fields, "version", "I", self.version)
        self._pack(out, fields, "n_tensors", "Q", len(self.tensors))
        self._pack(out, fields, "n_kv", "Q", len(self.kv))
        fields["header"] = Field(0, len(out), None)
        kv_start = len(out)
        for key, value in self.kv:
            start = len(out)
            label = "kv:" + key
            self._string(out, fields, label + ".key_len", key)
            vtype = infer_type(value)
            self._pack(out, fields, label + ".type", "I", vtype)
            value_start = len(out)
            self._value(out, fields, label, vtype, value)
            fields[label + ".value"] = Field(value_start, len(out) - value_start, None)
            fields[label] = Field(start, len(out) - start, None)
        fields["kv"] = Field(kv_start, len(out) - kv_start, None)

        align = self.layout_alignment
        offsets, cursor = [], 0
        for name, ggml_type, shape, data, offset in self.tensors:
            if offset is None:
                offset = -cursor % align + cursor
            offsets.append(offset)
            cursor = max(cursor, offset + len(data))
        info_start = len(out)
        for (name, ggml_type, shape, data, _), offset in zip(self.tensors, offsets):
            start = len(out)
            label = "tensor:" + name
            self._string(out, fields, label + ".name_len", name)
            self._pack(out, fields, label + ".n_dims", "I", len(shape))
            for j, dim in enumerate(shape):
                self._pack(out, fields, "%s.dim%d" % (label, j), "Q", dim)
            self._pack(out, fields, label + ".type", "I", ggml_type)
            self._pack(out, fields, label + ".offset", "Q", offset)
            fields[label] = Field(start, len(out) - start, None)
        fields["tensor_info"] = Field(info_start, len(out) - info_start, None)
        out += bytes(-len(out) % align)
        data_start = len(out)
        data = bytearray(-cursor % align + cursor)
        for (name, _, _, raw, _), offset in zip(self.tensors, offsets):
            data[offset:offset + len(raw)] = raw
            fields["data:" + name] = Field(data_start + offset, len(raw), None)
        out += data
        fields["data"] = Field(data_start, len(data), None)
        return Built(out, fields, self.endian)

    def write(self, path):
        return self.build().write(path)


# ---------------------------------------------------------------------------
# An independent reader (trusting, for checking the writer itself)

def read_gguf(buf):
    """Parses a well-formed little-endian GGUF: (version, [(key, vtype, value)],
    {name: (type, shape, bytes)}, alignment, data_start)."""
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0]

    def string(raw=False):
        nonlocal pos
        n = take("Q")
        pos += n
        data = bytes(buf[pos - n:pos])
        return data if raw else data.decode("utf-8", "replace")

    def value(vtype, in_array=False):
        if vtype in SCALAR_CODES:
            return take(SCALAR_CODES[vtype])
        if vtype == STRING:
            return string(raw=in_array)  # strings in arrays stay UTF-8, as picolm keeps them
        elem, count = take("I"), take("Q")
        return [value(elem, True) for _ in range(count)]

    assert bytes(buf[:4]) == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    kv = []
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        kv.append((key, vtype, value(vtype)))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, take("I"), shape, take("Q")))
    alignment = dict((k, v) for k, _, v in kv).get("general.alignment", 32)
    data_start = -pos % alignment + pos
    tensors = {}
    for name, t, shape, offset in infos:
        size = tensor_nbytes(t, shape) if type_name(t) in BLOCKS else 0
        tensors[name] = (t, shape, bytes(buf[data_start + offset:data_start + offset + size]))
    return version, kv, tensors, alignment, data_start


# ---------------------------------------------------------------------------
# Numbers: fp16/bf16/f32 rounding

def f16(x):
    return struct.unpack("<e", struct.pack("<e", x))[0]


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16_bits(x):
    """Round-to-nearest-even bf16 bits of a finite float."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _half(data, pos):
    return struct.unpack_from("<e", data, pos)[0]


def dequantize_block(name, b):
    """The floats of one block `b` (bytes) of type `name`, as ggml-quants.c computes them
    (in double precision here)."""
    y = []
    if name == "Q4_0":
        d = _half(b, 0)
        qs = b[2:18]
        return [((q & 0xF) - 8) * d for q in qs] + [((q >> 4) - 8) * d for q in qs]
    if name == "Q4_1":
        d, m = _half(b, 0), _half(b, 2)
        qs = b[4:20]
        return [(q & 0xF) * d + m for q in qs] + [(q >> 4) * d + m for q in qs]
    if name in ("Q5_0", "Q5_1"):
        d = _half(b, 0)
        m = _half(b, 2) if name == "Q5_1" else None
        off = 4 if m is not None else 2
        qh = struct.unpack_from("<I", b, off)[0]
        qs = b[off + 4:off + 20]
        lo = [(q & 0xF) | (((qh >> j) & 1) << 4) for j, q in enumerate(qs)]
        hi = [(q >> 4) | (((qh >> (j + 16)) & 1) << 4) for j, q in enumerate(qs)]
        if m is None:
            return [(x - 16) * d for x in lo + hi]
        return [x * d + m for x in lo + hi]
    if name == "Q8_0":
        d = _half(b, 0)
        return [q * d for q in struct.unpack_from("<32b", b, 2)]
    if name == "IQ4_NL":
        d = _half(b, 0)
        qs = b[2:18]
        return ([d * KVALUES_IQ4NL[q & 0xF] for q in qs]
                + [d * KVALUES_IQ4NL[q >> 4] for q in qs])
    if name == "IQ4_XS":
        d = _half(b, 0)
        scales_h = struct.unpack_from("<H", b, 2)[0]
        scales_l = b[4:8]
        qs = b[8:136]
        for ib in range(8):
            ls = ((scales_l[ib // 2] >> 4 * (ib % 2)) & 0xF) | (((scales_h >> 2 * ib) & 3) << 4)
            dl = d * (ls - 32)
            q = qs[16 * ib:16 * ib + 16]
            y += [dl * KVALUES_IQ4NL[v & 0xF] for v in q]
            y += [dl * KVALUES_IQ4NL[v >> 4] for v in q]
        return y
    if name == "Q2_K":
        scales, qs = b[0:16], b[16:80]
        d, dmin = _half(b, 80), _half(b, 82)
        i = 0
        for n in range(2):
            q = qs[32 * n:32 * n + 32]
            for shift in (0, 2, 4, 6):
                for half in (0, 16):
                    sc = scales[i]
                    i += 1
                    dl, ml = d * (sc & 0xF), dmin * (sc >> 4)
                    y += [dl * ((v >> shift) & 3) - ml for v in q[half:half + 16]]
        return y
    if name == "Q3_K":
        hmask, qs, raw_scales = b[0:32], b[32:96], b[96:108]
        d = _half(b, 108)
        aux = list(struct.unpack("<3I", raw_scales))
        tmp = aux[2]
        k1, k2 = 0x03030303, 0x0F0F0F0F
        aux = [(aux[0] & k2) | (((tmp >> 0) & k1) << 4),
               (aux[1] & k2) | (((tmp >> 2) & k1) << 4),
               ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
               ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4)]
        scales = struct.unpack("<16b", struct.pack("<4I", *aux))
        i, m = 0, 1
        for n in range(2):
            q = qs[32 * n:32 * n + 32]
            for shift in (0, 2, 4, 6):
                for half in (0, 16):
                    dl = d * (scales[i] - 32)
                    i += 1
                    y += [dl * (((q[half + l] >> shift) & 3) - (0 if hmask[half + l] & m else 4))
                          for l in range(16)]
                m <<= 1
        return y
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _half(b, 0), _half(b, 2)
        scales = b[4:16]
        if name == "Q4_K":
            qh, qs = None, b[16:144]
        else:
            qh, qs = b[16:48], b[48:176]
        for j in range(4):
            sc1, m1 = _scale_min_k4(2 * j, scales)
            sc2, m2 = _scale_min_k4(2 * j + 1, scales)
            q = qs[32 * j:32 * j + 32]
            if qh is None:
                y += [d * sc1 * (v & 0xF) - dmin * m1 for v in q]
                y += [d * sc2 * (v >> 4) - dmin * m2 for v in q]
            else:
                u1, u2 = 1 << (2 * j), 2 << (2 * j)
                y += [d * sc1 * ((v & 0xF) + (16 if h & u1 else 0)) - dmin * m1
                      for v, h in zip(q, qh)]
                y += [d * sc2 * ((v >> 4) + (16 if h & u2 else 0)) - dmin * m2
                      for v, h in zip(q, qh)]
        return y
    if name == "Q6_K":
        ql, qh = b[0:128], b[128:192]
        sc = struct.unpack_from("<16b", b, 192)
        d = _half(b, 208)
        for n in range(2):
            l0, h0, s0 = 64 * n, 32 * n, 8 * n
            out = [0.0] * 128
            for l in range(32):
                i = s0 + l // 16
                a, c, h = ql[l0 + l], ql[l0 + l + 32], qh[h0 + l]
                out[l] = d * sc[i] * (((a & 0xF) | ((h & 3) << 4)) - 32)
                out[l + 32] = d * sc[i + 2] * (((c & 0xF) | (((h >> 2) & 3) << 4)) - 32)
                out[l + 64] = d * sc[i + 4] * (((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                out[l + 96] = d * sc[i + 6] * (((c >> 4) | (((h >> 6) & 3) << 4)) - 32)
            y += out
        return y
    raise ValueError("no decoder for %s" % name)


def dequantize(t, data, n):
    """Our own decoding of the first n elements of `data` (type id or name)."""
    name = type_name(t)
    data = bytes(data)
    if name == "F32":
        return list(struct.unpack_from("<%df" % n, data))
    if name == "F16":
        return list(struct.unpack_from("<%de" % n, data))
    if name == "BF16":
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0]
                for h in struct.unpack_from("<%dH" % n, data)]
    block_size, block_bytes = BLOCKS[name]
    out = []
    for i in range(n // block_size):
        out += dequantize_block(name, data[i * block_bytes:(i + 1) * block_bytes])
    return out


# ---------------------------------------------------------------------------
# Encoders: given floats (simple reference quantizers) or random valid blocks

def quantize(t, values):
    """Encodes floats as F32, F16, BF16, Q8_0, Q4_0 or Q4_1 (ggml's reference rounding)."""
    name = type_name(t)
    if name == "F32":
        return struct.pack("<%df" % len(values), *values)
    if name == "F16":
        return struct.pack("<%de" % len(values), *values)
    if name == "BF16":
        return struct.pack("<%dH" % len(values), *map(bf16_bits, values))
    out = bytearray()
    for i in range(0, len(values), 32):
        x = values[i:i + 32]
        assert len(x) == 32, "length must be a multiple of 32"
        if name == "Q8_0":
            amax = max(abs(v) for v in x)
            d = amax / 127.0
            inv = 1.0 / d if d else 0.0
            out += struct.pack("<e32b", d, *[int(round(v * inv)) for v in x])
        elif name == "Q4_0":
            vmax = max(x, key=abs)
            d = vmax / -8.0
            inv = 1.0 / d if d else 0.0
            q = [min(15, int(v * inv + 8.5)) for v in x]
            out += struct.pack("<e", d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
        elif name == "Q4_1":
            lo, hi = min(x), max(x)
            d = (hi - lo) / 15.0
            inv = 1.0 / d if d else 0.0
            q = [min(15, int((v - lo) * inv + 0.5)) for v in x]
            out += struct.pack("<ee", d, lo) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
        else:
            raise ValueError("no quantizer for %s (use random_tensor)" % name)
    return bytes(out)


def _rand_bytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "little")


def random_block(name, rng, scale):
    """One random, valid block whose values are of order `scale` (finite fp16 scales)."""
    u = rng.uniform
    if name == "Q4_0":
        return struct.pack("<e", scale / 8 * u(0.5, 1.0)) + _rand_bytes(rng, 16)
    if name == "Q4_1":
        d = scale / 8 * u(0.5, 1.0)
        return struct.pack("<ee", d, -8 * d * u(0.8, 1.2)) + _rand_bytes(rng, 16)
    if name == "Q5_0":
        return struct.pack("<e", scale / 16 * u(0.5, 1.0)) + _rand_bytes(rng, 20)
    if name == "Q5_1":
        d = scale / 16 * u(0.5, 1.0)
        return struct.pack("<ee", d, -16 * d * u(0.8, 1.2)) + _rand_bytes(rng, 20)
    if name == "Q8_0":  # int8 quants in -127..127, as ggml's quantizer makes them
        return (struct.pack("<e", scale / 127 * u(0.5, 1.0))
                + _rand_bytes(rng, 32).replace(b"\x80", b"\x81"))
    if name == "IQ4_NL":
        return struct.pack("<e", scale / 127 * u(0.5, 1.0)) + _rand_bytes(rng, 16)
    if name == "IQ4_XS":
        return (struct.pack("<eH", scale / (32 * 127) * u(0.5, 1.0), rng.getrandbits(16))
                + _rand_bytes(rng, 132))
    if name == "Q2_K":
        scales = bytes(rng.randint(1, 15) | (rng.randint(0, 15) << 4) for _ in range(16))
        return (scales + _rand_bytes(rng, 64)
                + struct.pack("<ee", scale / 45 * u(0.5, 1.0), scale / 30 * u(0.5, 1.0)))
    if name == "Q3_K":
        return _rand_bytes(rng, 108) + struct.pack("<e", scale / 128 * u(0.5, 1.0))
    if name == "Q4_K":
        return (struct.pack("<ee", scale / (63 * 15) * u(0.5, 1.0),
                            scale / (63 * 2) * u(0.5, 1.0)) + _rand_bytes(rng, 140))
    if name == "Q5_K":
        return (struct.pack("<ee", scale / (63 * 31) * u(0.5, 1.0),
                            scale / (63 * 2) * u(0.5, 1.0)) + _rand_bytes(rng, 172))
    if name == "Q6_K":
        return (_rand_bytes(rng, 192) + struct.pack("<16b", *[rng.randint(-64, 63)
                                                            for _ in range(16)])
                + struct.pack("<e", scale / (64 * 32) * u(0.5, 1.0)))
    raise ValueError("no random blocks for %s" % name)


def random_tensor(t, n, rng, scale=0.25, center=0.0):
    """(bytes, floats) of n random elements of type t, of magnitude about `scale`."""
    name = type_name(t)
    if name in ("F32", "F16", "BF16"):
        values = [center + rng.uniform(-scale, scale) for _ in range(n)]
        data = quantize(name, values)
        return data, dequantize(name, data, n)
    block_size, block_bytes = BLOCKS[name]
    assert n % block_size == 0, "%d elements are not whole %s blocks" % (n, name)
    data = b"".join(random_block(name, rng, scale) for _ in range(n // block_size))
    return data, dequantize(name, data, n)


# ---------------------------------------------------------------------------
# A tiny llama model with a gpt2-style byte-level BPE vocabulary

def bytes_to_unicode():
    """GPT-2's table: every byte -> a printable character (space -> 'Ġ', '\\n' -> 'Ċ')."""
    printable = (list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BPE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world, hello there! "
    "Once upon a time there was a little model that read the weights of the world "
    "and wrote them out again, token by token, in the order of the text. "
    "This is the test of the tokenizer: the theme is that there are then these other "
    "things in the inn, and the winter is in the north. 123 456 7890 "
    "It is what it is; we wrote what we read and we read what we wrote.\n"
)
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_bpe(n_merges, text=BPE_CORPUS):
    """Deterministic byte-level BPE merges learnt on `text`: a list of up to n_merges
    (left, right) pairs, as many as the text allows."""
    enc = bytes_to_unicode()
    words = {}
    for piece in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", text):
        word = tuple(enc[b] for b in piece.encode("utf-8"))
        words[word] = words.get(word, 0) + 1
    merges = []
    while len(merges) < n_merges:
        pairs = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


@functools.lru_cache(maxsize=None)
def _vocab(n_vocab):
    tokens, types, merges = _make_vocab(n_vocab)
    return tuple(tokens), tuple(types), tuple(merges)


def make_vocab(n_vocab):
    """(tokens, token_types, merges): control tokens, the 256 byte tokens, merged tokens."""
    return tuple(map(list, _vocab(n_vocab)))


def _make_vocab(n_vocab):
    """(tokens, token_types, merges): control tokens, the 256 byte tokens, merged tokens."""
    enc = bytes_to_unicode()
    tokens = list(CONTROL_TOKENS) + [enc[b] for b in range(256)]
    types = [3] * len(CONTROL_TOKENS) + [1] * 256
    if n_vocab < len(tokens):
        raise ValueError("n_vocab must be at least %d" % len(tokens))
    known = set(tokens)
    merges = []
    for left, right in train_bpe(4 * n_vocab):
        if len(tokens) == n_vocab:
            break
        merges.append(left + " " + right)
        if left + right not in known:
            known.add(left + right)
            tokens.append(left + right)
            types.append(1)
    # beyond what the corpus teaches: two-letter tokens, each with its merge
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = ((a, b) for a in letters for b in letters)
    while len(tokens) < n_vocab:
        left, right = next(pairs)
        if left + right not in known:
            known.add(left + right)
            merges.append(left + " " + right)
            tokens.append(left + right)
            types.append(1)
    return tokens, types, merges


TinyLlama = namedtuple("TinyLlama",
                       "path hparams metadata weights types tokens merges writer built")


def tiny_llama_tensor_shapes(n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, head_dim,
                             tied=True):
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    shapes = [("token_embd.weight", (n_embd, n_vocab)), ("output_norm.weight", (n_embd,))]
    if not tied:
        shapes.append(("output.weight", (n_embd, n_vocab)))
    for i in range(n_layer):
        shapes += [("blk.%d.attn_norm.weight" % i, (n_embd,)),
                   ("blk.%d.attn_q.weight" % i, (n_embd, q_dim)),
                   ("blk.%d.attn_k.weight" % i, (n_embd, kv_dim)),
                   ("blk.%d.attn_v.weight" % i, (n_embd, kv_dim)),
                   ("blk.%d.attn_output.weight" % i, (q_dim, n_embd)),
                   ("blk.%d.ffn_norm.weight" % i, (n_embd,)),
                   ("blk.%d.ffn_gate.weight" % i, (n_embd, n_ff)),
                   ("blk.%d.ffn_up.weight" % i, (n_embd, n_ff)),
                   ("blk.%d.ffn_down.weight" % i, (n_ff, n_embd))]
    return shapes


def make_tiny_llama(path, quant_type="Q8_0", n_layer=2, n_embd=64, n_head=4, n_head_kv=2,
                    n_ff=128, n_vocab=300, seed=0, tied=True, embd_type=None, output_type=None,
                    norm_type="F32", version=3, alignment=None, n_ctx_train=256,
                    norm_eps=1e-5, rope_base=10000.0, head_dim=None, pre="smollm",
                    weight_scale=0.25, fallback_type="Q8_0", metadata=None, drop_tensors=(),
                    extra_tensors=(), shapes=None, corrupt=None):
    """Writes a random tiny llama model to `path`; returns a TinyLlama describing it.

    quant_type: type of every weight matrix (name or id); embd_type/output_type default
    to it; a matrix whose rows are not whole blocks of its type gets fallback_type (as
    llama.cpp's quantizer does); norms are norm_type (F32). head_dim other than
    n_embd // n_head is written as attention.key_length/value_length.
    metadata: {key: value} applied last (None removes a key; use Typed/Arr/Raw for
    explicit types). drop_tensors: names left out.
    extra_tensors: (name, type, shape) added with random data. shapes: {name: shape}
    overrides a tensor's shape (its data is sized for the new shape).
    corrupt(built): called on the Built before writing (patch fields there).
    """
    rng = random.Random(seed)
    explicit_head_dim = head_dim is not None and head_dim != n_embd // n_head
    head_dim = head_dim or n_embd // n_head
    quant_type = type_name(quant_type)
    embd_type = type_name(embd_type or quant_type)
    output_type = type_name(output_type or quant_type)
    tokens, token_types, merges = make_vocab(n_vocab)
    w = GGUFWriter(version=version, alignment=alignment)
    md = [
        ("general.architecture", "llama"),
        ("general.name", "picolm tiny test model"),
        ("llama.block_count", n_layer),
        ("llama.context_length", n_ctx_train),
        ("llama.embedding_length", n_embd),
        ("llama.feed_forward_length", n_ff),
        ("llama.attention.head_count", n_head),
        ("llama.attention.head_count_kv", n_head_kv),
        ("llama.rope.freq_base", float(rope_base)),
        ("llama.attention.layer_norm_rms_epsilon", float(norm_eps)),
        ("general.file_type", 1),
        ("llama.vocab_size", n_vocab),
        ("llama.rope.dimension_count", head_dim),
        ("tokenizer.ggml.add_space_prefix", False),
        ("tokenizer.ggml.add_bos_token", False),
        ("tokenizer.ggml.model", "gpt2"),
        ("tokenizer.ggml.pre", pre),
        ("tokenizer.ggml.tokens", Arr(STRING, tokens)),
        ("tokenizer.ggml.token_type", Arr(INT32, token_types)),
        ("tokenizer.ggml.merges", Arr(STRING, merges)),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.unknown_token_id", 0),
        ("tokenizer.ggml.padding_token_id", 2),
        ("general.quantization_version", 2),
    ]
    if explicit_head_dim:
        md += [("llama.attention.key_length", head_dim), ("llama.attention.value_length", head_dim)]
    for key, value in md:
        w.add(key, value)
    for key, value in (metadata or {}).items():
        w.set(key, value)

    weights, types = {}, {}
    shape_list = tiny_llama_tensor_shapes(n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab,
                                          head_dim, tied)
    shape_list += [(name, tuple(shape)) for name, _, shape in extra_tensors]
    extra_types = {name: type_name(t) for name, t, _ in extra_tensors}
    for name, shape in shape_list:
        shape = tuple((shapes or {}).get(name, shape))
        if name in extra_types:
            t = extra_types[name]
        elif len(shape) == 1:
            t = norm_type
        elif name == "token_embd.weight":
            t = embd_type
        elif name == "output.weight":
            t = output_type
        else:
            t = quant_type
        if len(shape) > 1 and shape[0] % BLOCKS[t][0]:
            t = type_name(fallback_type)
        n = 1
        for d in shape:
            n *= d
        if len(shape) == 1 and t in ("F32", "F16", "BF16"):
            data, values = random_tensor(t, n, rng, 0.2, center=1.0)
        else:
            data, values = random_tensor(t, n, rng, weight_scale)
        if name in drop_tensors:
            continue
        w.add_tensor(name, t, shape, data)
        weights[name], types[name] = values, t
    hparams = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                   n_ff=n_ff, n_vocab=n_vocab, head_dim=head_dim, n_rot=head_dim,
                   norm_eps=f32(norm_eps), rope_base=f32(rope_base), tied=tied,
                   n_ctx_train=n_ctx_train)
    built = w.build()
    if corrupt is not None:
        corrupt(built)
    built.write(path)
    return TinyLlama(path, hparams, dict(w.kv), weights, types, tokens, merges, w, built)
