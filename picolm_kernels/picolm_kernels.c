/*
 * picolm_kernels.c: the optional C accelerator of picolm (C11; libc, libm, pthreads).
 *
 * Built by tools/build_accel.py into a shared library that picolm_kernels/__init__.py loads
 * with ctypes. It holds:
 *   - exact row dequantization for every type picolm reads (bit-identical to ggml's),
 *   - fused dequantize-and-dot kernels, three families:
 *       "float": the activations stay in float (error ~1e-7 relative), every type;
 *       "q8":    Q4_1 and Q8_0 compute llama.cpp's own float operations: activations in
 *                its 8-bit blocks, its lane order and FMAs (see "ggml's arithmetic"), so
 *                the results equal ggml's bit for bit;
 *       "qa":    the activations are quantized to 16-bit integers in blocks of 32 (a float
 *                scale per block) and the products are integer; Q4_0, Q5_0, Q5_1, IQ4_NL
 *                (and the K-quants with AVX2). Error bound of a dot: sum over blocks b of
 *                amax_b / 65534 * sum |w_i| over the block (at most 8.6e-5 of |row|*|x|,
 *                typically ~1e-6); pk_type_has_qa() gives 8, 16 or 0 (float),
 *   - a persistent thread pool (spin briefly, then sleep on a condition variable),
 *   - a whole-token (and batched-prefill) LLaMA forward pass reading the weights from a
 *     read-only map of the model file and the KV cache from a caller-owned FP16 buffer, in
 *     ggml's float operations (RMSNorm, RoPE, attention, SwiGLU; see "ggml's arithmetic").
 *
 * SIMD: AVX2+FMA+F16C on x86 when the compiler targets them, SSE2 otherwise on x86-64,
 * NEON on ARM, plain C elsewhere (or with -DPK_NO_SIMD); pk_isa() names the one compiled in.
 * Quant block layouts follow ggml (ggml-common.h); the code here is written from those facts.
 *
 * The API (types are ggml type ids; every pointer is caller-owned unless said otherwise):
 *   const char *pk_source_hash(void), *pk_isa(void);  int pk_version(void);
 *   int pk_type_block_size(int type), pk_type_block_bytes(int type), pk_type_has_qa(int type);
 *   int pk_dequantize(int type, const void *src, float *dst, int64_t n);
 *   pk_pool *pk_pool_new(int n_threads);  void pk_pool_free(pk_pool *);
 *   int pk_pool_threads(const pk_pool *);
 *   int pk_matmul(pk_pool *or_NULL, int type, const void *w, int64_t n_cols, int64_t n_rows,
 *                 const float *x, int n_tok, float *y, int quantize_x);
 *   int pk_matvec(pk_pool *, int type, const void *w, int64_t n_cols, int64_t n_rows,
 *                 const float *x, float *y, int quantize_x);
 *   int pk_quantize_act(const float *x, int64_t n, int16_t *q, float *d, float *s);
 *   pk_model *pk_model_new(const char *path, const int64_t *hp, int n_hp, const double *fp,
 *                          int n_fp, const float *freq_factors_or_NULL,
 *                          const int64_t *offsets, const int32_t *types, const int64_t *ne0,
 *                          const int64_t *ne1, int n_slots, int n_threads, int max_batch,
 *                          char *err, int err_len);
 *   void pk_model_free(pk_model *);  int pk_model_threads(const pk_model *);
 *   int pk_forward(pk_model *, const int32_t *tokens, int n_tokens, int pos, void *kv,
 *                  int64_t kv_bytes, float *logits_or_NULL, int logits_mode);
 *   int64_t pk_top(const float *x, int64_t n, int64_t k, int64_t *ids);
 *   void pk_f32_to_f16(const float *x, uint16_t *out, int64_t n);
 *   void pk_profile(int on, double *seconds_out_or_NULL);
 * A model (or pool) must be used by one caller thread at a time.
 */
#define _GNU_SOURCE /* MAP_POPULATE; everything else is POSIX */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* PK_NO_SIMD forces the plain-C kernels (to test them on any host) */
#if defined(PK_NO_SIMD)
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PK_AVX2 1
#include <immintrin.h>
#elif defined(__SSE2__) || defined(_M_X64)
#define PK_SSE2 1
#include <emmintrin.h>
#elif defined(__ARM_NEON) || defined(__ARM_NEON__)
#define PK_NEON 1
#include <arm_neon.h>
#endif

#ifndef PK_SOURCE_HASH
#define PK_SOURCE_HASH "unknown"
#endif

#define PK_EXPORT __attribute__((visibility("default")))
/* floats of attention scratch per thread: q, the 32 accumulator rows, the weights */
#define ATT_SCRATCH(m) ((size_t)33 * (m)->head_dim + (m)->n_ctx + 16)
#ifndef PK_PREFETCH
#define PK_PREFETCH 1024 /* bytes ahead to prefetch weights (0: leave it to the hardware) */
#endif
#define PK_VERSION 1
#define LLAMA_UBATCH 512 /* llama.cpp's default micro-batch (n_ubatch) */

/* ------------------------------------------------------------------------------------ */
/* Identification                                                                        */

/* "PK-HASH:<sha256>" is findable in the file's bytes too: a loader can tell a stale
 * library without loading it (a loaded library cannot be replaced in a process) */
__attribute__((used)) static const char pk_hash_marker[] = "PK-HASH:" PK_SOURCE_HASH;

PK_EXPORT const char *pk_source_hash(void) { return pk_hash_marker + 8; }

/* "PK-ISA:<isa>" is also findable in the file's bytes, so a loader can refuse a library
 * built for an ISA this CPU lacks without loading it */
#if defined(PK_AVX2)
#define PK_ISA_NAME "avx2"
#elif defined(PK_SSE2)
#define PK_ISA_NAME "sse2"
#elif defined(PK_NEON)
#define PK_ISA_NAME "neon"
#else
#define PK_ISA_NAME "scalar"
#endif
__attribute__((used)) static const char pk_isa_marker[] = "PK-ISA:" PK_ISA_NAME;

PK_EXPORT const char *pk_isa(void) { return pk_isa_marker + 7; }

PK_EXPORT int pk_version(void) { return PK_VERSION; }

/* ------------------------------------------------------------------------------------ */
/* Types                                                                                 */

enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20,
    T_IQ4_XS = 23, T_BF16 = 30
};

/* block size (elements) and block bytes; 0 if unsupported */
static int type_block(int type, int *bytes) {
    int bs = 0, bb = 0;
    switch (type) {
    case T_F32: bs = 1; bb = 4; break;
    case T_F16: bs = 1; bb = 2; break;
    case T_BF16: bs = 1; bb = 2; break;
    case T_Q4_0: bs = 32; bb = 18; break;
    case T_Q4_1: bs = 32; bb = 20; break;
    case T_Q5_0: bs = 32; bb = 22; break;
    case T_Q5_1: bs = 32; bb = 24; break;
    case T_Q8_0: bs = 32; bb = 34; break;
    case T_IQ4_NL: bs = 32; bb = 18; break;
    case T_Q2_K: bs = 256; bb = 84; break;
    case T_Q3_K: bs = 256; bb = 110; break;
    case T_Q4_K: bs = 256; bb = 144; break;
    case T_Q5_K: bs = 256; bb = 176; break;
    case T_Q6_K: bs = 256; bb = 210; break;
    case T_IQ4_XS: bs = 256; bb = 136; break;
    default: break;
    }
    if (bytes) *bytes = bb;
    return bs;
}

/* The bits of the quantized activations the type's integer kernel takes: 8 for the types
 * computed with llama.cpp's own arithmetic (8-bit blocks, see "ggml's arithmetic"), 16 for
 * the other integer kernels, 0 when the activations stay in float */
static int type_has_qa(int type) {
    switch (type) {
    case T_Q4_1: case T_Q8_0:
        return 8;
    case T_Q4_0: case T_Q5_0: case T_Q5_1: case T_IQ4_NL:
        return 16;
#if defined(PK_AVX2) /* the K-quant integer kernels are AVX2 only; elsewhere float */
    case T_Q4_K: case T_Q5_K: case T_Q6_K:
        return 16;
#endif
    default:
        return 0;
    }
}

PK_EXPORT int pk_type_block_size(int type) { return type_block(type, NULL); }
PK_EXPORT int pk_type_block_bytes(int type) { int b; type_block(type, &b); return b; }
PK_EXPORT int pk_type_has_qa(int type) { return type_has_qa(type); }

static int64_t row_bytes(int type, int64_t n) {
    int bb, bs = type_block(type, &bb);
    return bs ? n / bs * bb : 0;
}

/* ------------------------------------------------------------------------------------ */
/* Half and bfloat16                                                                     */

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* exact IEEE half -> float (subnormals, infinities and NaNs included) */
static inline float half_to_float_sw(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    if (exp == 0) {
        if (mant == 0) return bits_f32(sign);
        /* subnormal: mant * 2^-24 is exact in float */
        float v = (float)mant * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exp == 31) return bits_f32(sign | 0x7F800000u | (mant << 13));
    return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

/* float -> half, round to nearest even; overflow gives infinity (as F16C does) */
static inline uint16_t float_to_half_sw(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u | ((ax >> 13) & 0x3FFu) : 0));
    if (ax >= 0x477FF000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7C00u);
    if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign; /* < 2^-25: rounds to zero */
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax + 0xC8000000u; /* rebias exponent: -112 << 23 */
    uint32_t q = r >> 13, rem = r & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

#if defined(PK_AVX2)
static inline float h2f(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }
#else
static inline float h2f(const uint8_t *p) { return half_to_float_sw(rd16(p)); }
#endif

static inline float bf2f(const uint8_t *p) { return bits_f32((uint32_t)rd16(p) << 16); }

/* ------------------------------------------------------------------------------------ */
/* Exact dequantization of one block (the same float operations, in the same order, as
 * ggml's dequantize_row_*; this file is compiled with contraction off so no FMA fuses
 * them).                                                                                */

static const int8_t kvalues_iq4nl[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static void dq_q4_0(const uint8_t *b, float *y) {
    const float d = h2f(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        const int x0 = (qs[j] & 0x0F) - 8, x1 = (qs[j] >> 4) - 8;
        y[j] = x0 * d;
        y[j + 16] = x1 * d;
    }
}

static void dq_q4_1(const uint8_t *b, float *y) {
    const float d = h2f(b), m = h2f(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        const int x0 = qs[j] & 0x0F, x1 = qs[j] >> 4;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

static void dq_q5_0(const uint8_t *b, float *y) {
    const float d = h2f(b);
    const uint32_t qh = rd32(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        const uint8_t h0 = (uint8_t)(((qh >> j) << 4) & 0x10);
        const uint8_t h1 = (uint8_t)((qh >> (j + 12)) & 0x10);
        const int x0 = ((qs[j] & 0x0F) | h0) - 16, x1 = ((qs[j] >> 4) | h1) - 16;
        y[j] = x0 * d;
        y[j + 16] = x1 * d;
    }
}

static void dq_q5_1(const uint8_t *b, float *y) {
    const float d = h2f(b), m = h2f(b + 2);
    const uint32_t qh = rd32(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        const uint8_t h0 = (uint8_t)(((qh >> j) << 4) & 0x10);
        const uint8_t h1 = (uint8_t)((qh >> (j + 12)) & 0x10);
        const int x0 = (qs[j] & 0x0F) | h0, x1 = (qs[j] >> 4) | h1;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

static void dq_q8_0(const uint8_t *b, float *y) {
    const float d = h2f(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = qs[j] * d;
}

static void dq_iq4_nl(const uint8_t *b, float *y) {
    const float d = h2f(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * kvalues_iq4nl[qs[j] & 0x0F];
        y[j + 16] = d * kvalues_iq4nl[qs[j] >> 4];
    }
}

static void dq_q2_k(const uint8_t *b, float *y) {
    const uint8_t *scales = b, *q = b + 16;
    const float d = h2f(b + 80), min = h2f(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; j++) {
            uint8_t sc = scales[is++];
            float dl = d * (sc & 0xF), ml = min * (sc >> 4);
            for (int l = 0; l < 16; l++) *y++ = dl * ((int8_t)((q[l] >> shift) & 3)) - ml;
            sc = scales[is++];
            dl = d * (sc & 0xF);
            ml = min * (sc >> 4);
            for (int l = 0; l < 16; l++) *y++ = dl * ((int8_t)((q[l + 16] >> shift) & 3)) - ml;
            shift += 2;
        }
        q += 32;
    }
}

/* the sixteen 6-bit scales of Q3_K, as signed values (still offset by 32) */
static void q3k_scales(const uint8_t *s12, int8_t *out) {
    uint32_t aux[4];
    memcpy(aux, s12, 12);
    const uint32_t kmask1 = 0x03030303u, kmask2 = 0x0f0f0f0fu, tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    memcpy(out, aux, 16);
}

static void dq_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b, *q = b + 32;
    const float d_all = h2f(b + 108);
    int8_t scales[16];
    q3k_scales(b + 96, scales);
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; j++) {
            float dl = d_all * (scales[is++] - 32);
            for (int l = 0; l < 16; l++)
                *y++ = dl * ((int8_t)((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
            dl = d_all * (scales[is++] - 32);
            for (int l = 0; l < 16; l++)
                *y++ = dl * ((int8_t)((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
            shift += 2;
            m <<= 1;
        }
        q += 32;
    }
}

static inline void k4_scale_min(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void dq_q4_k(const uint8_t *b, float *y) {
    const float d = h2f(b), min = h2f(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    int is = 0;
    for (int j = 0; j < 256; j += 64) {
        uint8_t sc, m;
        k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * sc, m1 = min * m;
        k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * sc, m2 = min * m;
        for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        q += 32;
        is += 2;
    }
}

static void dq_q5_k(const uint8_t *b, float *y) {
    const float d = h2f(b), min = h2f(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    int is = 0;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < 256; j += 64) {
        uint8_t sc, m;
        k4_scale_min(is, scales, &sc, &m);
        const float d1 = d * sc, m1 = min * m;
        k4_scale_min(is + 1, scales, &sc, &m);
        const float d2 = d * sc, m2 = min * m;
        for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
        ql += 32;
        is += 2;
        u1 <<= 2;
        u2 <<= 2;
    }
}

static void dq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = h2f(b + 208);
    for (int n = 0; n < 256; n += 128) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int8_t q1 = (int8_t)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int8_t q3 = (int8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

static void dq_iq4_xs(const uint8_t *b, float *y) {
    const float d = h2f(b);
    const uint16_t scales_h = rd16(b + 2);
    const uint8_t *scales_l = b + 4, *qs = b + 8;
    for (int ib = 0; ib < 8; ib++) {
        const int ls = ((scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
        const float dl = d * (ls - 32);
        for (int j = 0; j < 16; j++) {
            y[j] = dl * kvalues_iq4nl[qs[j] & 0xf];
            y[j + 16] = dl * kvalues_iq4nl[qs[j] >> 4];
        }
        y += 32;
        qs += 16;
    }
}

typedef void (*dq_fn)(const uint8_t *, float *);

static dq_fn block_dequantizer(int type) {
    switch (type) {
    case T_Q4_0: return dq_q4_0;
    case T_Q4_1: return dq_q4_1;
    case T_Q5_0: return dq_q5_0;
    case T_Q5_1: return dq_q5_1;
    case T_Q8_0: return dq_q8_0;
    case T_IQ4_NL: return dq_iq4_nl;
    case T_Q2_K: return dq_q2_k;
    case T_Q3_K: return dq_q3_k;
    case T_Q4_K: return dq_q4_k;
    case T_Q5_K: return dq_q5_k;
    case T_Q6_K: return dq_q6_k;
    case T_IQ4_XS: return dq_iq4_xs;
    default: return NULL;
    }
}

static void dequantize_row(int type, const uint8_t *src, float *dst, int64_t n) {
    switch (type) {
    case T_F32: memcpy(dst, src, (size_t)n * 4); return;
    case T_F16: {
        int64_t i = 0;
#if defined(PK_AVX2)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
#endif
        for (; i < n; i++) dst[i] = h2f(src + 2 * i);
        return;
    }
    case T_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = bf2f(src + 2 * i);
        return;
    default: {
        int bb, bs = type_block(type, &bb);
        dq_fn f = block_dequantizer(type);
        for (int64_t i = 0; i < n / bs; i++) f(src + i * bb, dst + i * bs);
    }
    }
}

/* 0 on success, -1 for an unknown type or an n that is not a whole number of blocks */
PK_EXPORT int pk_dequantize(int type, const void *src, float *dst, int64_t n) {
    int bs = type_block(type, NULL);
    if (!bs || n < 0 || n % bs) return -1;
    dequantize_row(type, (const uint8_t *)src, dst, n);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Float dot products                                                                    */

#if defined(PK_AVX2)
/* the sum of a vector's 8 lanes */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#endif

static float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#if defined(PK_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a0 = _mm256_add_ps(a0, a1);
    sum = hsum8(a0);
#elif defined(PK_SSE2)
    __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps();
    const int64_t n8 = n - n % 8;
    for (; i < n8; i += 8) {
        a0 = _mm_add_ps(a0, _mm_mul_ps(_mm_loadu_ps(a + i), _mm_loadu_ps(b + i)));
        a1 = _mm_add_ps(a1, _mm_mul_ps(_mm_loadu_ps(a + i + 4), _mm_loadu_ps(b + i + 4)));
    }
    a0 = _mm_add_ps(a0, a1);
    float t[4];
    _mm_storeu_ps(t, a0);
    sum = (t[0] + t[1]) + (t[2] + t[3]);
#elif defined(PK_NEON)
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
    const int64_t n8 = n - n % 8;
    for (; i < n8; i += 8) {
        a0 = vmlaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
        a1 = vmlaq_f32(a1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    a0 = vaddq_f32(a0, a1);
    float t[4];
    vst1q_f32(t, a0);
    sum = (t[0] + t[1]) + (t[2] + t[3]);
#else
    float s4[4] = {0, 0, 0, 0};
    const int64_t n4 = n - n % 4;
    for (; i < n4; i += 4) {
        s4[0] += a[i] * b[i];
        s4[1] += a[i + 1] * b[i + 1];
        s4[2] += a[i + 2] * b[i + 2];
        s4[3] += a[i + 3] * b[i + 3];
    }
    sum = (s4[0] + s4[1]) + (s4[2] + s4[3]);
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float dot_f16_f32(const uint8_t *w, const float *x, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#if defined(PK_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i))),
                             _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i + 16))),
                             _mm256_loadu_ps(x + i + 8), a1);
    }
    a0 = _mm256_add_ps(a0, a1);
    sum = hsum8(a0);
#else
    float buf[64];
    for (; i + 64 <= n; i += 64) {
        for (int j = 0; j < 64; j++) buf[j] = h2f(w + 2 * (i + j));
        sum += dot_f32(buf, x + i, 64);
    }
#endif
    for (; i < n; i++) sum += h2f(w + 2 * i) * x[i];
    return sum;
}

static float dot_bf16_f32(const uint8_t *w, const float *x, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#if defined(PK_AVX2)
    __m256 a0 = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + 2 * i)));
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(x + i), a0);
    }
    sum = hsum8(a0);
#else
    float buf[64];
    for (; i + 64 <= n; i += 64) {
        for (int j = 0; j < 64; j++) buf[j] = bf2f(w + 2 * (i + j));
        sum += dot_f32(buf, x + i, 64);
    }
#endif
    for (; i < n; i++) sum += bf2f(w + 2 * i) * x[i];
    return sum;
}

/* fused dequantize-and-dot with float activations: one block at a time into L1 */
static float dot_float(int type, const uint8_t *w, const float *x, int64_t n) {
    switch (type) {
    case T_F32: {
        /* rows of an F32 tensor may be unaligned; dot_f32 only uses unaligned loads */
        return dot_f32((const float *)(const void *)w, x, n);
    }
    case T_F16: return dot_f16_f32(w, x, n);
    case T_BF16: return dot_bf16_f32(w, x, n);
    default: break;
    }
    int bb, bs = type_block(type, &bb);
    dq_fn f = block_dequantizer(type);
    float buf[256];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / bs; i++) {
        f(w + i * bb, buf);
        sum += dot_f32(buf, x + i * bs, bs);
    }
    return sum;
}

/* ------------------------------------------------------------------------------------ */
/* Quantized activations: blocks of 32 values as int16 q with a float scale d           */
/* (= amax/32767) and s = d * sum(q). Integer products need no float conversion of the   */
/* weights, and 16 bits keep the activations' error ~1e-5 of a value (8 bits would give  */
/* ~0.4%, which moves this 135M model's logits by ~0.4 and its greedy tokens with them). */

#define QA_MAX 32767.0f
#define PK_RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

typedef struct {
    const float *f;   /* float values, n per token */
    const int16_t *q; /* quantized values, n per token (or NULL) */
    const float *d;   /* n/32 scales per token */
    const float *s;   /* n/32 scaled sums per token */
    const float *dT, *sT; /* d and s transposed: [block][token], n_tok per block */
    const int8_t *q8;     /* 8-bit blocks as ggml's Q8_0/Q8_1 (or NULL), n per token */
    const float *d8, *s8; /* their scales and scaled sums (FP16 values), n/32 per token */
    int64_t n;
    int n_tok;
} act_t;

static void quantize_act(const float *x, int64_t n, int16_t *q, float *d, float *s) {
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        int16_t *qb = q + 32 * b;
#if defined(PK_AVX2)
        const __m256 signbit = _mm256_set1_ps(-0.0f);
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float amax = _mm_cvtss_f32(m4);
        const float dd = amax / QA_MAX, id = amax > 0.0f ? QA_MAX / amax : 0.0f;
        const __m256 mul = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), PK_RN));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), PK_RN));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), PK_RN));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), PK_RN));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        const int isum = _mm_cvtsi128_si32(s4);
        /* packs works within 128-bit lanes: put the 64-bit quarters back in order */
        _mm256_storeu_si256((__m256i *)qb, _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8));
        _mm256_storeu_si256((__m256i *)(qb + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8));
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        const float dd = amax / QA_MAX, id = amax > 0.0f ? QA_MAX / amax : 0.0f;
        int isum = 0;
        for (int j = 0; j < 32; j++) {
            long v = lrintf(xb[j] * id);
            if (v > 32767) v = 32767;
            if (v < -32767) v = -32767;
            qb[j] = (int16_t)v;
            isum += (int)v;
        }
#endif
        d[b] = dd;
        s[b] = dd * (float)isum;
    }
}

#if defined(PK_AVX2)
/* 16-bit lane i = 0x10 where bit i of bits is set */
static inline __m256i hbits16(uint32_t bits) {
    const __m256i mask = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                           16384, (short)-32768);
    const __m256i v = _mm256_and_si256(_mm256_set1_epi16((short)bits), mask);
    return _mm256_and_si256(_mm256_cmpeq_epi16(v, mask), _mm256_set1_epi16(0x10));
}

/* one 32-block of weights as two vectors of 16 int16 (elements 0-15, 16-31): value = d*q + m */
typedef struct {
    __m256i lo, hi;
    float d, m;
} wblk;

static inline __attribute__((always_inline)) void unpack16(const int type, const uint8_t *b, wblk *o) {
    const __m256i low4 = _mm256_set1_epi16(15);
    switch (type) {
    case T_Q4_0: {
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 2)));
        o->lo = _mm256_sub_epi16(_mm256_and_si256(w, low4), _mm256_set1_epi16(8));
        o->hi = _mm256_sub_epi16(_mm256_srli_epi16(w, 4), _mm256_set1_epi16(8));
        o->d = h2f(b);
        o->m = 0.0f;
        break;
    }
    case T_Q4_1: {
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(b)));
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 4)));
        o->lo = _mm256_and_si256(w, low4);
        o->hi = _mm256_srli_epi16(w, 4);
        o->d = _mm_cvtss_f32(dm);
        o->m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
        break;
    }
    case T_Q5_0: {
        const uint32_t qh = rd32(b + 2);
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 6)));
        o->lo = _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(w, low4), hbits16(qh)), _mm256_set1_epi16(16));
        o->hi = _mm256_sub_epi16(_mm256_or_si256(_mm256_srli_epi16(w, 4), hbits16(qh >> 16)), _mm256_set1_epi16(16));
        o->d = h2f(b);
        o->m = 0.0f;
        break;
    }
    case T_Q5_1: {
        const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(b)));
        const uint32_t qh = rd32(b + 4);
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 8)));
        o->lo = _mm256_or_si256(_mm256_and_si256(w, low4), hbits16(qh));
        o->hi = _mm256_or_si256(_mm256_srli_epi16(w, 4), hbits16(qh >> 16));
        o->d = _mm_cvtss_f32(dm);
        o->m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
        break;
    }
    case T_Q8_0:
        o->lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 2)));
        o->hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 18)));
        o->d = h2f(b);
        o->m = 0.0f;
        break;
    case T_IQ4_NL: {
        const __m128i table = _mm_loadu_si128((const __m128i *)kvalues_iq4nl);
        const __m128i raw = _mm_loadu_si128((const __m128i *)(b + 2));
        const __m128i m4 = _mm_set1_epi8(15);
        o->lo = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(table, _mm_and_si128(raw, m4)));
        o->hi = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(raw, 4), m4)));
        o->d = h2f(b);
        o->m = 0.0f;
        break;
    }
    default:
        o->lo = o->hi = _mm256_setzero_si256();
        o->d = o->m = 0.0f;
        break;
    }
}

static inline __attribute__((always_inline)) __m256 madd2(const wblk *k, const int16_t *y) {
    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(k->lo, _mm256_loadu_si256((const __m256i *)y)),
                                       _mm256_madd_epi16(k->hi, _mm256_loadu_si256((const __m256i *)(y + 16))));
    return _mm256_cvtepi32_ps(p);
}

/* lane t = sum of the 8 lanes of p_t (a transpose-and-add) */
static inline __m256i reduce8(__m256i p0, __m256i p1, __m256i p2, __m256i p3, __m256i p4, __m256i p5,
                              __m256i p6, __m256i p7) {
    const __m256i a01 = _mm256_add_epi32(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
    const __m256i a23 = _mm256_add_epi32(_mm256_unpacklo_epi32(p2, p3), _mm256_unpackhi_epi32(p2, p3));
    const __m256i a45 = _mm256_add_epi32(_mm256_unpacklo_epi32(p4, p5), _mm256_unpackhi_epi32(p4, p5));
    const __m256i a67 = _mm256_add_epi32(_mm256_unpacklo_epi32(p6, p7), _mm256_unpackhi_epi32(p6, p7));
    const __m256i b03 = _mm256_add_epi32(_mm256_unpacklo_epi64(a01, a23), _mm256_unpackhi_epi64(a01, a23));
    const __m256i b47 = _mm256_add_epi32(_mm256_unpacklo_epi64(a45, a67), _mm256_unpackhi_epi64(a45, a67));
    /* b03: 128-bit lane 0 holds p0..p3 summed over their lanes 0-3, lane 1 over lanes 4-7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(b03, b47, 0x20), _mm256_permute2x128_si256(b03, b47, 0x31));
}

static inline __attribute__((always_inline)) __m256i madd2i(const wblk *k, const int16_t *y) {
    return _mm256_add_epi32(_mm256_madd_epi16(k->lo, _mm256_loadu_si256((const __m256i *)y)),
                            _mm256_madd_epi16(k->hi, _mm256_loadu_si256((const __m256i *)(y + 16))));
}

/* scales (and minimums, when the type has them) of 8 consecutive blocks */
static inline __attribute__((always_inline)) void scales8(const int bb, const int has_m, const uint8_t *w,
                                                          __m256 *d, __m256 *m) {
#define H16(o) ((short)rd16(w + (o)))
    *d = _mm256_cvtph_ps(_mm_setr_epi16(H16(0), H16(bb), H16(2 * bb), H16(3 * bb), H16(4 * bb), H16(5 * bb),
                                        H16(6 * bb), H16(7 * bb)));
    if (has_m)
        *m = _mm256_cvtph_ps(_mm_setr_epi16(H16(2), H16(bb + 2), H16(2 * bb + 2), H16(3 * bb + 2), H16(4 * bb + 2),
                                            H16(5 * bb + 2), H16(6 * bb + 2), H16(7 * bb + 2)));
#undef H16
}

/* one row . one token: eight blocks at a time, their integer sums reduced to one vector
 * (lane j = block j) and scaled with one multiply */
static inline __attribute__((always_inline)) float dotq1(const int type, const int bb, const int has_m,
                                                         const uint8_t *w, int64_t nb, const int16_t *q,
                                                         const float *xd, const float *xs) {
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        const uint8_t *wb = w + b * bb;
        const int16_t *y = q + 32 * b;
#if PK_PREFETCH
        _mm_prefetch((const char *)wb + PK_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)wb + PK_PREFETCH + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)wb + PK_PREFETCH + 128, _MM_HINT_T0);
        if (bb * 8 > 192) _mm_prefetch((const char *)wb + PK_PREFETCH + 192, _MM_HINT_T0);
        if (bb * 8 > 256) _mm_prefetch((const char *)wb + PK_PREFETCH + 256, _MM_HINT_T0);
#endif
        wblk k0, k1, k2, k3, k4, k5, k6, k7;
        unpack16(type, wb, &k0);
        unpack16(type, wb + bb, &k1);
        unpack16(type, wb + 2 * bb, &k2);
        unpack16(type, wb + 3 * bb, &k3);
        unpack16(type, wb + 4 * bb, &k4);
        unpack16(type, wb + 5 * bb, &k5);
        unpack16(type, wb + 6 * bb, &k6);
        unpack16(type, wb + 7 * bb, &k7);
        const __m256i p = reduce8(madd2i(&k0, y), madd2i(&k1, y + 32), madd2i(&k2, y + 64), madd2i(&k3, y + 96),
                                  madd2i(&k4, y + 128), madd2i(&k5, y + 160), madd2i(&k6, y + 192),
                                  madd2i(&k7, y + 224));
        __m256 dw, mw;
        scales8(bb, has_m, wb, &dw, &mw);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_loadu_ps(xd + b)), acc);
        if (has_m) macc = _mm256_fmadd_ps(mw, _mm256_loadu_ps(xs + b), macc);
    }
    float msum = 0.0f;
    for (; b < nb; b++) {
        wblk k;
        unpack16(type, w + b * bb, &k);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(k.d * xd[b]), madd2(&k, q + 32 * b), acc);
        if (has_m) msum += k.m * xs[b];
    }
    return hsum8(has_m ? _mm256_add_ps(acc, macc) : acc) + msum;
}

/* one row . four tokens: the block is unpacked once for all four */
static inline __attribute__((always_inline)) void dotq4(const int type, const int bb, const uint8_t *w, int64_t nb,
                                                        const act_t *a, int t0, float *out) {
    const int64_t n = a->n;
    const int16_t *q0 = a->q + (t0 + 0) * n, *q1 = a->q + (t0 + 1) * n;
    const int16_t *q2 = a->q + (t0 + 2) * n, *q3 = a->q + (t0 + 3) * n;
    const float *d0 = a->d + (t0 + 0) * (n / 32), *d1 = a->d + (t0 + 1) * (n / 32);
    const float *d2 = a->d + (t0 + 2) * (n / 32), *d3 = a->d + (t0 + 3) * (n / 32);
    const float *s0 = a->s + (t0 + 0) * (n / 32), *s1 = a->s + (t0 + 1) * (n / 32);
    const float *s2 = a->s + (t0 + 2) * (n / 32), *s3 = a->s + (t0 + 3) * (n / 32);
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
    float m0 = 0.0f, m1 = 0.0f, m2 = 0.0f, m3 = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        wblk k;
#if PK_PREFETCH
        _mm_prefetch((const char *)(w + b * bb) + PK_PREFETCH, _MM_HINT_T0);
#endif
        unpack16(type, w + b * bb, &k);
        c0 = _mm256_fmadd_ps(_mm256_set1_ps(k.d * d0[b]), madd2(&k, q0 + 32 * b), c0);
        c1 = _mm256_fmadd_ps(_mm256_set1_ps(k.d * d1[b]), madd2(&k, q1 + 32 * b), c1);
        c2 = _mm256_fmadd_ps(_mm256_set1_ps(k.d * d2[b]), madd2(&k, q2 + 32 * b), c2);
        c3 = _mm256_fmadd_ps(_mm256_set1_ps(k.d * d3[b]), madd2(&k, q3 + 32 * b), c3);
        m0 += k.m * s0[b];
        m1 += k.m * s1[b];
        m2 += k.m * s2[b];
        m3 += k.m * s3[b];
    }
    out[0] = hsum8(c0) + m0;
    out[1] = hsum8(c1) + m1;
    out[2] = hsum8(c2) + m2;
    out[3] = hsum8(c3) + m3;
}
/* one row . eight tokens, one lane per token: the block is unpacked once, the integer sums
 * reduced across lanes, and the scales of eight tokens applied in one multiply */
static inline __attribute__((always_inline)) void dotq8tok(const int type, const int bb, const int has_m,
                                                        const uint8_t *w, int64_t nb, const act_t *a, int t0,
                                                        float *out) {
    const int64_t n = a->n;
    const int ld = a->n_tok;
    const int16_t *q = a->q + t0 * n;
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        wblk k;
#if PK_PREFETCH
        _mm_prefetch((const char *)(w + b * bb) + PK_PREFETCH, _MM_HINT_T0);
#endif
        unpack16(type, w + b * bb, &k);
        const int16_t *y = q + 32 * b;
        const __m256i p = reduce8(madd2i(&k, y), madd2i(&k, y + n), madd2i(&k, y + 2 * n), madd2i(&k, y + 3 * n),
                                  madd2i(&k, y + 4 * n), madd2i(&k, y + 5 * n), madd2i(&k, y + 6 * n),
                                  madd2i(&k, y + 7 * n));
        const __m256 dx = _mm256_loadu_ps(a->dT + b * ld + t0);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dx, _mm256_set1_ps(k.d)), acc);
        if (has_m) macc = _mm256_fmadd_ps(_mm256_set1_ps(k.m), _mm256_loadu_ps(a->sT + b * ld + t0), macc);
    }
    _mm256_storeu_ps(out, has_m ? _mm256_add_ps(acc, macc) : acc);
}
#endif

/* Unpacks one 32-block to integers w (the portable kernels): value = d*w + m */
static void unpack32(int type, const uint8_t *b, int16_t *w, float *d, float *m) {
    *m = 0.0f;
    switch (type) {
    case T_Q4_0:
        *d = h2f(b);
        for (int j = 0; j < 16; j++) {
            w[j] = (int16_t)((b[2 + j] & 15) - 8);
            w[j + 16] = (int16_t)((b[2 + j] >> 4) - 8);
        }
        break;
    case T_Q4_1:
        *d = h2f(b);
        *m = h2f(b + 2);
        for (int j = 0; j < 16; j++) {
            w[j] = (int16_t)(b[4 + j] & 15);
            w[j + 16] = (int16_t)(b[4 + j] >> 4);
        }
        break;
    case T_Q5_0: case T_Q5_1: {
        const int one = type == T_Q5_1;
        const uint32_t qh = rd32(b + (one ? 4 : 2));
        const uint8_t *qs = b + (one ? 8 : 6);
        *d = h2f(b);
        if (one) *m = h2f(b + 2);
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) & 1) << 4, h1 = (int)((qh >> (j + 16)) & 1) << 4;
            w[j] = (int16_t)(((qs[j] & 15) | h0) - (one ? 0 : 16));
            w[j + 16] = (int16_t)(((qs[j] >> 4) | h1) - (one ? 0 : 16));
        }
        break;
    }
    case T_Q8_0:
        *d = h2f(b);
        for (int j = 0; j < 32; j++) w[j] = (int8_t)b[2 + j];
        break;
    case T_IQ4_NL:
        *d = h2f(b);
        for (int j = 0; j < 16; j++) {
            w[j] = kvalues_iq4nl[b[2 + j] & 15];
            w[j + 16] = kvalues_iq4nl[b[2 + j] >> 4];
        }
        break;
    default:
        *d = 0.0f;
        memset(w, 0, 64);
        break;
    }
}

/* out[i] = row . token (t0 + i) for i < nt, with the quantized activations */
#if defined(PK_AVX2)
/* float lane t = sum of the 8 lanes of p_t */
static inline __m256 reduce8_ps(__m256 p0, __m256 p1, __m256 p2, __m256 p3, __m256 p4, __m256 p5, __m256 p6,
                                __m256 p7) {
    const __m256 a01 = _mm256_add_ps(_mm256_unpacklo_ps(p0, p1), _mm256_unpackhi_ps(p0, p1));
    const __m256 a23 = _mm256_add_ps(_mm256_unpacklo_ps(p2, p3), _mm256_unpackhi_ps(p2, p3));
    const __m256 a45 = _mm256_add_ps(_mm256_unpacklo_ps(p4, p5), _mm256_unpackhi_ps(p4, p5));
    const __m256 a67 = _mm256_add_ps(_mm256_unpacklo_ps(p6, p7), _mm256_unpackhi_ps(p6, p7));
    const __m256 b03 = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a01), _mm256_castps_pd(a23))),
                                     _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a01), _mm256_castps_pd(a23))));
    const __m256 b47 = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a45), _mm256_castps_pd(a67))),
                                     _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a45), _mm256_castps_pd(a67))));
    return _mm256_add_ps(_mm256_permute2f128_ps(b03, b47, 0x20), _mm256_permute2f128_ps(b03, b47, 0x31));
}

static inline __m256i madd16(__m256i lo, __m256i hi, const int16_t *y) {
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)y)),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(y + 16))));
}

/* the 8 sub-block scales and minimums of a Q4_K / Q5_K block, times d and -dmin */
static inline void k4_scales8(const uint8_t *blk, __m256 *dv, __m256 *mv) {
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; j++) k4_scale_min(j, blk + 4, &sc[j], &mn[j]);
    uint64_t s8, m8;
    memcpy(&s8, sc, 8);
    memcpy(&m8, mn, 8);
    *dv = _mm256_mul_ps(_mm256_set1_ps(h2f(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)s8))));
    *mv = _mm256_mul_ps(_mm256_set1_ps(-h2f(blk + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m8))));
}

/* one row of a K-quant (256-blocks) . one token: the 256 values of a block are the 8
 * activation blocks b..b+7, one integer sum each, reduced to one vector and scaled once */
static float dot_qa_k(int type, const uint8_t *w, int64_t nsb, const int16_t *q, const float *xd, const float *xs) {
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi16(15);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const int16_t *y = q + 256 * sb;
        const __m256 dx = _mm256_loadu_ps(xd + 8 * sb), sx = _mm256_loadu_ps(xs + 8 * sb);
        if (type == T_Q6_K) {
            const uint8_t *blk = w + sb * 210;
            _mm_prefetch((const char *)blk + 420, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 484, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 548, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 612, _MM_HINT_T0);
            const int8_t *sc = (const int8_t *)(blk + 192);
            const __m256i lo4 = _mm256_set1_epi8(15), lo2 = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
            __m256 p[8];
            for (int h = 0; h < 2; h++) {
                const __m256i A = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
                const __m256i B = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
                const __m256i H = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
                __m256i v[4];
                v[0] = _mm256_or_si256(_mm256_and_si256(A, lo4), _mm256_slli_epi16(_mm256_and_si256(H, lo2), 4));
                v[1] = _mm256_or_si256(_mm256_and_si256(B, lo4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 2), lo2), 4));
                v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), lo4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 4), lo2), 4));
                v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), lo4),
                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 6), lo2), 4));
                for (int k = 0; k < 4; k++) {
                    const __m256i qk = _mm256_sub_epi8(v[k], off); /* -32 .. 31 */
                    const __m256i lo = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(qk)),
                                                          _mm256_set1_epi16(sc[8 * h + 2 * k]));
                    const __m256i hi = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(qk, 1)),
                                                          _mm256_set1_epi16(sc[8 * h + 2 * k + 1]));
                    /* |sum| may pass 2^31 over 32 values: to float per lane first */
                    p[4 * h + k] = _mm256_cvtepi32_ps(madd16(lo, hi, y + 32 * (4 * h + k)));
                }
            }
            const __m256 P = reduce8_ps(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
            acc = _mm256_fmadd_ps(P, _mm256_mul_ps(dx, _mm256_set1_ps(h2f(blk + 208))), acc);
            continue;
        }
        /* Q4_K, Q5_K: value = d*sc_j*q - dmin*m_j per 32-value sub-block j */
        const int five = type == T_Q5_K;
        const uint8_t *blk = w + sb * (five ? 176 : 144);
        _mm_prefetch((const char *)blk + 320, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 384, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 448, _MM_HINT_T0);
        const uint8_t *qs = blk + (five ? 48 : 16);
        __m256 dv, mv;
        k4_scales8(blk, &dv, &mv);
        __m256i hb0 = _mm256_setzero_si256(), hb1 = _mm256_setzero_si256();
        if (five) {
            hb0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + 16)));
            hb1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + 32)));
        }
        __m256i p[8];
        for (int i = 0; i < 4; i++) {
            const __m256i A = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 32 * i)));
            const __m256i B = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qs + 32 * i + 16)));
            __m256i a0 = _mm256_and_si256(A, m4), b0 = _mm256_and_si256(B, m4);
            __m256i a1 = _mm256_srli_epi16(A, 4), b1 = _mm256_srli_epi16(B, 4);
            if (five) { /* bit 2i of qh[l] is the fifth bit of sub-block 2i, bit 2i+1 of 2i+1 */
                const __m256i sixteen = _mm256_set1_epi16(16);
                a0 = _mm256_or_si256(a0, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hb0, 2 * i), 4), sixteen));
                b0 = _mm256_or_si256(b0, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hb1, 2 * i), 4), sixteen));
                a1 = _mm256_or_si256(a1, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hb0, 2 * i + 1), 4), sixteen));
                b1 = _mm256_or_si256(b1, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hb1, 2 * i + 1), 4), sixteen));
            }
            p[2 * i] = madd16(a0, b0, y + 64 * i);
            p[2 * i + 1] = madd16(a1, b1, y + 64 * i + 32);
        }
        const __m256i P = reduce8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(P), _mm256_mul_ps(dv, dx), acc);
        macc = _mm256_fmadd_ps(mv, sx, macc);
    }
    return hsum8(_mm256_add_ps(acc, macc));
}
#endif

static void dot_qa(int type, const uint8_t *w, const act_t *a, int t0, int nt, float *out) {
    const int64_t n = a->n, nb = n / 32;
#if defined(PK_AVX2)
    if (type == T_Q4_K || type == T_Q5_K || type == T_Q6_K) {
        for (int i = 0; i < nt; i++)
            out[i] = dot_qa_k(type, w, n / 256, a->q + (t0 + i) * n, a->d + (t0 + i) * nb, a->s + (t0 + i) * nb);
        return;
    }
#define PK_KERNEL(T, BB, HAS_M)                                                               \
    case T:                                                                                   \
        for (; nt >= 8; nt -= 8, t0 += 8, out += 8) dotq8tok(T, BB, HAS_M, w, nb, a, t0, out); \
        for (; nt >= 4; nt -= 4, t0 += 4, out += 4) dotq4(T, BB, w, nb, a, t0, out);           \
        for (; nt > 0; nt--, t0++, out++)                                                     \
            *out = dotq1(T, BB, HAS_M, w, nb, a->q + t0 * n, a->d + t0 * nb, a->s + t0 * nb); \
        return;
    switch (type) {
        PK_KERNEL(T_Q4_0, 18, 0)
        PK_KERNEL(T_Q4_1, 20, 1)
        PK_KERNEL(T_Q5_0, 22, 0)
        PK_KERNEL(T_Q5_1, 24, 1)
        PK_KERNEL(T_Q8_0, 34, 0)
        PK_KERNEL(T_IQ4_NL, 18, 0)
    default:
        break;
    }
#undef PK_KERNEL
#endif
    int bb;
    type_block(type, &bb);
    for (int i = 0; i < nt; i++) out[i] = 0.0f;
    int16_t v[32];
    for (int64_t b = 0; b < nb; b++) {
        float d, m;
        unpack32(type, w + b * bb, v, &d, &m);
        for (int i = 0; i < nt; i++) {
            const int t = t0 + i;
            const int16_t *y = a->q + t * n + 32 * b;
            int32_t isum = 0;
            for (int j = 0; j < 32; j++) isum += (int32_t)v[j] * (int32_t)y[j];
            out[i] += d * a->d[t * nb + b] * (float)isum + m * a->s[t * nb + b];
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* ggml's arithmetic                                                                     */
/*
 * llama.cpp (ggml's CPU backend with AVX2+FMA) rounds every activation that enters a Q4_1
 * or Q8_0 matrix to 8-bit blocks, and those roundings are discontinuous: any difference in
 * the last bit of a float upstream moves its logits by 0.1-0.4. To choose the tokens it
 * chooses, the forward pass repeats its float operations exactly, in its order:
 *   - activations: blocks of 32, d = amax/127, q = round-to-even(x * (127/amax)), and for
 *     Q8_1 s = d * sum(q); d and s are stored as FP16;
 *   - a dot product: per block, 8 integer lanes of 4 consecutive products, each lane
 *     fused-multiply-added (scale d_w*d_x) into its own float accumulator; then the 8
 *     accumulators summed pairwise (hsum8); Q4_1's m*s terms in a separate fused chain,
 *     added last;
 *   - its exp (ggml_v_expf), SiLU, softmax, FP16 dot products (four 8-lane accumulators),
 *     RMSNorm (double sum of float squares) and RoPE (float angle recurrence, cosf/sinf).
 * Each function below states which ggml routine it repeats; the facts come from ggml's
 * sources, the code is ours. Every result is computed whole by one thread, so the bits
 * depend neither on the thread count nor on how tokens are batched.
 */

static inline float round_half(float f) { return half_to_float_sw(float_to_half_sw(f)); }

/* quantize_row_q8_1 (its d and q are quantize_row_q8_0's) */
static void quantize_q8(const float *x, int64_t n, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
#if defined(PK_AVX2)
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        const float dd = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m256i i32[4];
        for (int i = 0; i < 4; i++)
            i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)), PK_RN));
        const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        const int sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
        /* packs work within 128-bit lanes: the permutation puts the bytes back in order */
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
        _mm256_storeu_si256((__m256i *)(q + 32 * b),
                            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float dd = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int v = (int)lrintf(xb[j] * id); /* the default rounding: to nearest even */
            q[32 * b + j] = (int8_t)v;
            sum += v;
        }
#endif
        d[b] = round_half(dd);
        s[b] = round_half(dd * (float)sum);
    }
}

/* hsum_float_8: (l0+l4 + l2+l6) + (l1+l5 + l3+l7) */
static inline float hsum8_ggml(const float *l) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* the 8 integer lanes (4 consecutive products each) of one Q4_1 or Q8_0 block . Q8 block */
static inline void q8_block_lanes(const int type, const uint8_t *blk, const int8_t *y, int32_t *lane) {
    int w[32];
    if (type == T_Q4_1)
        for (int j = 0; j < 16; j++) {
            w[j] = blk[4 + j] & 15;
            w[j + 16] = blk[4 + j] >> 4;
        }
    else
        for (int j = 0; j < 32; j++) w[j] = (int8_t)blk[2 + j];
    for (int k = 0; k < 8; k++)
        lane[k] = w[4 * k] * y[4 * k] + w[4 * k + 1] * y[4 * k + 1] + w[4 * k + 2] * y[4 * k + 2] +
                  w[4 * k + 3] * y[4 * k + 3];
}

#if defined(PK_AVX2)
/* a block's 32 weights as bytes in element order: 0..15 for Q4_1, signed for Q8_0 */
static inline __attribute__((always_inline)) __m256i q8_wbytes(const int type, const uint8_t *blk) {
    if (type == T_Q4_1) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 4));
        return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(15));
    }
    return _mm256_loadu_si256((const __m256i *)(blk + 2));
}

/* mul_sum_us8_pairs_float / mul_sum_i8_pairs_float: the 8 lanes as floats */
static inline __attribute__((always_inline)) __m256 q8_lanes(const int type, __m256i w, __m256i y) {
    const __m256i p = type == T_Q4_1 ? _mm256_maddubs_epi16(w, y)
                                     : _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* R rows (row_bytes apart) . T tokens: out[r * ldo + t]; the rows' blocks are read once for
 * all T tokens and the R*T accumulator chains run side by side */
static inline __attribute__((always_inline)) void q8_tile(const int type, const int R, const int T,
                                                          const uint8_t *w, int64_t rbytes, const act_t *a,
                                                          int t0, float *out, int ldo) {
    const int bb = type == T_Q4_1 ? 20 : 34;
    const int64_t n = a->n, nb = n / 32;
    __m256 acc[8];
    float ms[8];
    for (int i = 0; i < R * T; i++) {
        acc[i] = _mm256_setzero_ps();
        ms[i] = 0.0f;
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[4];
        float dw[4], mw[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + r * rbytes + b * bb;
#if PK_PREFETCH
            _mm_prefetch((const char *)blk + PK_PREFETCH, _MM_HINT_T0);
#endif
            wv[r] = q8_wbytes(type, blk);
            dw[r] = h2f(blk);
            mw[r] = type == T_Q4_1 ? h2f(blk + 2) : 0.0f;
        }
        for (int t = 0; t < T; t++) {
            const __m256i y = _mm256_loadu_si256((const __m256i *)(a->q8 + (int64_t)(t0 + t) * n + 32 * b));
            const float dx = a->d8[(int64_t)(t0 + t) * nb + b], sx = a->s8[(int64_t)(t0 + t) * nb + b];
            for (int r = 0; r < R; r++) {
                acc[r * T + t] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx), q8_lanes(type, wv[r], y), acc[r * T + t]);
                if (type == T_Q4_1) ms[r * T + t] = fmaf(mw[r], sx, ms[r * T + t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[r * ldo + t] = hsum8(acc[r * T + t]) + ms[r * T + t];
}

/* 8 rows (row_bytes apart) . token t: out[r * ldo]. The products and sums of each row are
 * q8_tile's; the per-block scalars go 8 rows at a time, one row per lane: the rows' d
 * converted at once and multiplied by d_x in one vector multiply (each lane the scalar
 * product), their m*s chains as the lanes of one vector of FMAs */
static inline __attribute__((always_inline)) void q8_rows8(const int type, const uint8_t *w, int64_t rbytes,
                                                           const act_t *a, int t, float *out, int ldo) {
    const int bb = type == T_Q4_1 ? 20 : 34;
    const int64_t n = a->n, nb = n / 32;
    const int8_t *yq = a->q8 + (int64_t)t * n;
    const float *xd = a->d8 + (int64_t)t * nb, *xs = a->s8 + (int64_t)t * nb;
    __m256 acc[8], ms = _mm256_setzero_ps();
    for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
#define PK_H8(o)                                                                                         \
    _mm256_cvtph_ps(_mm_setr_epi16((short)rd16(p + (o)), (short)rd16(p + rbytes + (o)),                   \
                                   (short)rd16(p + 2 * rbytes + (o)), (short)rd16(p + 3 * rbytes + (o)),   \
                                   (short)rd16(p + 4 * rbytes + (o)), (short)rd16(p + 5 * rbytes + (o)),   \
                                   (short)rd16(p + 6 * rbytes + (o)), (short)rd16(p + 7 * rbytes + (o))))
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = w + b * bb;
        __m256 dw;
        if (type == T_Q4_1) { /* d and m are adjacent: one 32-bit load per row, then split */
            const __m256i dm = _mm256_setr_epi32((int)rd32(p), (int)rd32(p + rbytes), (int)rd32(p + 2 * rbytes),
                                                 (int)rd32(p + 3 * rbytes), (int)rd32(p + 4 * rbytes),
                                                 (int)rd32(p + 5 * rbytes), (int)rd32(p + 6 * rbytes),
                                                 (int)rd32(p + 7 * rbytes));
            const __m256i split = _mm256_permute4x64_epi64(
                _mm256_shuffle_epi8(dm, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5,
                                                         8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)),
                0xD8);
            dw = _mm256_cvtph_ps(_mm256_castsi256_si128(split));
            ms = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(split, 1)), _mm256_set1_ps(xs[b]), ms);
        } else {
            dw = PK_H8(0);
        }
        const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(xd[b]));
        const __m256i y = _mm256_loadu_si256((const __m256i *)(yq + 32 * b));
#if PK_PREFETCH
        /* the next 8 rows (contiguous), swept in order over this tile's blocks: 8 interleaved
         * streams are more than the hardware prefetcher follows */
        for (int k = 0; k < 8 * bb; k += 64) _mm_prefetch((const char *)w + 8 * rbytes + b * 8 * bb + k, _MM_HINT_T0);
#endif
        for (int r = 0; r < 8; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dd, _mm256_set1_epi32(r)),
                                     q8_lanes(type, q8_wbytes(type, p + r * rbytes), y), acc[r]);
    }
#undef PK_H8
    float m8[8];
    _mm256_storeu_ps(m8, ms);
    for (int r = 0; r < 8; r++) out[r * ldo] = hsum8(acc[r]) + m8[r];
}
#endif

/* nr rows from row w (row_bytes apart) . nt tokens from t0: out[r * ldo + t] */
static void q8_dots(int type, const uint8_t *w, int64_t rbytes, int nr, const act_t *a, int t0, int nt, float *out,
                    int ldo) {
#if defined(PK_AVX2)
#define PK_Q8(T_)                                                                                       \
    if (nt == 1) { /* one token: eight rows at a time */                                                \
        int r = 0;                                                                                      \
        for (; r + 8 <= nr; r += 8) q8_rows8(T_, w + r * rbytes, rbytes, a, t0, out + r * ldo, ldo);      \
        for (; r < nr; r++) q8_tile(T_, 1, 1, w + r * rbytes, rbytes, a, t0, out + r * ldo, ldo);         \
    } else { /* a batch: two rows by four tokens */                                                     \
        int r = 0;                                                                                      \
        for (; r + 2 <= nr; r += 2) {                                                                   \
            int t = 0;                                                                                  \
            for (; t + 4 <= nt; t += 4) q8_tile(T_, 2, 4, w + r * rbytes, rbytes, a, t0 + t, out + r * ldo + t, ldo); \
            for (; t < nt; t++) q8_tile(T_, 2, 1, w + r * rbytes, rbytes, a, t0 + t, out + r * ldo + t, ldo); \
        }                                                                                               \
        for (; r < nr; r++)                                                                             \
            for (int t = 0; t < nt; t++) q8_tile(T_, 1, 1, w + r * rbytes, rbytes, a, t0 + t, out + r * ldo + t, ldo); \
    }                                                                                                   \
    return;
    if (type == T_Q4_1) { PK_Q8(T_Q4_1) }
    PK_Q8(T_Q8_0)
#undef PK_Q8
#elif defined(PK_NEON) && defined(__aarch64__)
    /* the same 8 lanes as two 4-lane vectors: products widened to 16 bits, then summed in
     * pairs twice, so lane k holds products 4k..4k+3; vfmaq_f32 is a fused multiply-add
     * (-mfpu=neon on armv7 has none: it takes the plain-C path below, with libm's fmaf) */
    const int bb = type == T_Q4_1 ? 20 : 34;
    const int64_t n = a->n, nb = n / 32;
    for (int r = 0; r < nr; r++)
        for (int t = t0; t < t0 + nt; t++) {
            float32x4_t lo = vdupq_n_f32(0.0f), hi = vdupq_n_f32(0.0f);
            float ms = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = w + r * rbytes + b * bb;
                const int8_t *y = a->q8 + (int64_t)t * n + 32 * b;
                int8x16_t w0, w1;
                if (type == T_Q4_1) {
                    const uint8x16_t raw = vld1q_u8(blk + 4);
                    w0 = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(15)));
                    w1 = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
                } else {
                    w0 = vld1q_s8((const int8_t *)(blk + 2));
                    w1 = vld1q_s8((const int8_t *)(blk + 18));
                }
                const int8x16_t y0 = vld1q_s8(y), y1 = vld1q_s8(y + 16);
                const int32x4_t l03 = vpaddq_s32(vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(y0))),
                                                 vpaddlq_s16(vmull_s8(vget_high_s8(w0), vget_high_s8(y0))));
                const int32x4_t l47 = vpaddq_s32(vpaddlq_s16(vmull_s8(vget_low_s8(w1), vget_low_s8(y1))),
                                                 vpaddlq_s16(vmull_s8(vget_high_s8(w1), vget_high_s8(y1))));
                const float32x4_t dd = vdupq_n_f32(h2f(blk) * a->d8[(int64_t)t * nb + b]);
                lo = vfmaq_f32(lo, vcvtq_f32_s32(l03), dd);
                hi = vfmaq_f32(hi, vcvtq_f32_s32(l47), dd);
                if (type == T_Q4_1) ms = fmaf(h2f(blk + 2), a->s8[(int64_t)t * nb + b], ms);
            }
            float acc[8];
            vst1q_f32(acc, lo);
            vst1q_f32(acc + 4, hi);
            out[r * ldo + (t - t0)] = hsum8_ggml(acc) + ms;
        }
#else
    const int bb = type == T_Q4_1 ? 20 : 34;
    const int64_t n = a->n, nb = n / 32;
    for (int r = 0; r < nr; r++)
        for (int t = t0; t < t0 + nt; t++) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, ms = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = w + r * rbytes + b * bb;
                int32_t lane[8];
                q8_block_lanes(type, blk, a->q8 + (int64_t)t * n + 32 * b, lane);
                const float dd = h2f(blk) * a->d8[(int64_t)t * nb + b];
                for (int k = 0; k < 8; k++) acc[k] = fmaf(dd, (float)lane[k], acc[k]);
                if (type == T_Q4_1) ms = fmaf(h2f(blk + 2), a->s8[(int64_t)t * nb + b], ms);
            }
            out[r * ldo + (t - t0)] = hsum8_ggml(acc) + ms;
        }
#endif
}

/* ggml_v_expf, one lane (the lanes are independent): e^x from 2^n times a polynomial */
static inline float expf_ggml(float x) {
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    const uint32_t e = f32_bits(z) << 23;
    const float k = bits_f32(e + f32_bits(1.0f));
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)), u,
                         0x1.ffffecp-1f * b);
    if (!(fabsf(n) > 126.0f)) return fmaf(k, j, k);
    /* 2^n out of float range for k: scaled in two steps, or saturated past 192 */
    const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;
    const float s1 = bits_f32(g + 0x7f000000u), s2 = bits_f32(e - g);
    return fabsf(n) > 192.0f ? s1 * s1 : fmaf(s2, j, s2) * s1;
}

#if defined(PK_AVX2)
/* expf_ggml on 8 lanes (ggml_v_expf itself); lanes out of the fast path go one by one */
static inline __m256 expf8_ggml(__m256 x) {
    const __m256 r = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
    const __m256 n = _mm256_sub_ps(z, r);
    const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
    const __m256 k = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(z), 23), _mm256_castps_si256(_mm256_set1_ps(1.0f))));
    const __m256 big = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), n), _mm256_set1_ps(126.0f), _CMP_GT_OQ);
    if (_mm256_movemask_ps(big)) {
        float v[8];
        _mm256_storeu_ps(v, x);
        for (int i = 0; i < 8; i++) v[i] = expf_ggml(v[i]);
        return _mm256_loadu_ps(v);
    }
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b, _mm256_set1_ps(0x1.573e2ep-5f)), u,
                        _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b, _mm256_set1_ps(0x1.fffdb6p-2f))),
        u, _mm256_mul_ps(_mm256_set1_ps(0x1.ffffecp-1f), b));
    return _mm256_fmadd_ps(k, j, k);
}
#endif

/* ggml_vec_swiglu_f32's element i of n: silu(g) * u, ggml_v_silu on the 8-wide part,
 * ggml_silu_f32 (libm's expf) on the tail */
static inline float swiglu_ggml(float g, float u, int64_t i, int64_t n) {
    const float e = i < (n & ~(int64_t)7) ? expf_ggml(0.0f - g) : expf(-g);
    return g / (1.0f + e) * u;
}

/* y[i * ldy] = swiglu_ggml(g[i * ld], u[i * ld], r0 + i, n) for i < cnt */
static void swiglu_rows(const float *g, const float *u, int ld, int64_t r0, int cnt, int64_t n, float *y,
                        int64_t ldy) {
    int i = 0;
#if defined(PK_AVX2)
    for (; i + 8 <= cnt && r0 + i + 8 <= (n & ~(int64_t)7); i += 8) {
        float gv[8], uv[8], out[8];
        for (int k = 0; k < 8; k++) {
            gv[k] = g[(i + k) * ld];
            uv[k] = u[(i + k) * ld];
        }
        const __m256 x = _mm256_loadu_ps(gv);
        const __m256 e = expf8_ggml(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                            _mm256_loadu_ps(uv)));
        for (int k = 0; k < 8; k++) y[(i + k) * ldy] = out[k];
    }
#endif
    for (; i < cnt; i++) y[i * ldy] = swiglu_ggml(g[i * ld], u[i * ld], r0 + i, n);
}

/* ggml_compute_forward_rms_norm_f32 followed by ggml_mul with the weight */
static void rmsnorm_ggml(const float *x, const float *w, float *out, int n, float eps) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)(x[i] * x[i]);
    const float mean = (float)(sum / n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* ggml_rope_cache_init (no YaRN): theta = pos * theta_scale^i by float recurrence,
 * divided by the frequency factor, times freq_scale; cosf and sinf of it */
static void rope_table_ggml(float *cos_out, float *sin_out, int pos, int half, int rope_dim, float base,
                            float freq_scale, const float *freq_factors) {
    const float theta_scale = powf(base, -2.0f / (float)rope_dim);
    float theta = (float)pos;
    for (int i = 0; i < half; i++) {
        const float t = freq_scale * (theta / (freq_factors ? freq_factors[i] : 1.0f));
        cos_out[i] = cosf(t);
        sin_out[i] = sinf(t);
        theta *= theta_scale;
    }
}

/* ggml's rotation as compiled (contracted): x0*c - x1*s and x0*s + x1*c, each one FMA */
static inline void rotate_ggml(float *a, float *b, float c, float s) {
    const float x0 = *a, x1 = *b;
    *a = fmaf(x0, c, -(x1 * s));
    *b = fmaf(x0, s, x1 * c);
}

/* ggml_vec_dot_f16's reduction of its four 8-lane accumulators acc[32] */
static inline float reduce_f16dot(const float *acc) {
    float x[8], t[4];
    for (int l = 0; l < 8; l++) x[l] = (acc[l] + acc[16 + l]) + (acc[8 + l] + acc[24 + l]);
    for (int l = 0; l < 4; l++) t[l] = x[l] + x[l + 4];
    return (t[0] + t[1]) + (t[2] + t[3]);
}

/* ggml_vec_dot_f16 of a cached K row (FP16) with q (FP16 values as floats): 32-element
 * steps into the four accumulators, a tail beyond them in double */
static inline float kq_ggml(const uint16_t *k, const float *q, int n) {
    const int np = n & ~31;
    float acc[32];
#if defined(PK_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int i = 0; i < np; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), _mm256_loadu_ps(q + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i + 8))), _mm256_loadu_ps(q + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i + 16))), _mm256_loadu_ps(q + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i + 24))), _mm256_loadu_ps(q + i + 24), a3);
    }
    if (np == n) { /* reduce_f16dot in registers */
        const __m256 x = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
        const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        const __m128 t1 = _mm_hadd_ps(t0, t0);
        return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
    }
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
    _mm256_storeu_ps(acc + 16, a2);
    _mm256_storeu_ps(acc + 24, a3);
#else
    for (int j = 0; j < 32; j++) acc[j] = 0.0f;
    for (int i = 0; i < np; i += 32)
        for (int j = 0; j < 32; j++) acc[j] = fmaf(half_to_float_sw(k[i + j]), q[i + j], acc[j]);
#endif
    double sum = reduce_f16dot(acc);
    for (int i = np; i < n; i++) sum += (double)(half_to_float_sw(k[i]) * q[i]);
    return (float)sum;
}

/* llamafile_sgemm's (tinyBLAS) FP16 dot, which llama.cpp's batches use instead: one 8-lane
 * accumulator over 8-element steps, then hsum8 (n a multiple of 8) */
static inline float kq_tinyblas(const uint16_t *k, const float *q, int n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#if defined(PK_AVX2)
    __m256 a = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8)
        a = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), _mm256_loadu_ps(q + i), a);
    return hsum8(a);
#else
    for (int i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] = fmaf(half_to_float_sw(k[i + j]), q[i + j], acc[j]);
#endif
    return hsum8_ggml(acc);
}

/* acc[(p % lanes) * n + d] += w * V[p][d] for d < n: position p's share of a dot product
 * over positions with `lanes` accumulators (V is transposed in llama.cpp; here each
 * accumulator is a row of n) */
static inline void v_accumulate(float *acc, float w, const uint16_t *v, int n) {
    int d = 0;
#if defined(PK_AVX2)
    const __m256 wv = _mm256_set1_ps(w);
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + d))), wv,
                                                  _mm256_loadu_ps(acc + d)));
#endif
    for (; d < n; d++) acc[d] = fmaf(half_to_float_sw(v[d]), w, acc[d]);
}

/* The cache lines of n FP16 values toward L1: a head's K or V rows are strided (a row of
 * every head per position), so the hardware prefetcher leaves attention waiting on memory */
static inline void prefetch_halves(const uint16_t *row, int n) {
#if defined(PK_AVX2) || defined(PK_SSE2)
    for (int b = 0; b < 2 * n; b += 64) _mm_prefetch((const char *)row + b, _MM_HINT_T0);
#else
    (void)row;
    (void)n;
#endif
}

#define ATT_PREFETCH 8 /* positions ahead */

/* One head of ggml's attention without flash attention, for a query at the last of n_pos
 * positions: kq = K.q (q as FP16), ggml_soft_max_ext (scale; ggml_vec_soft_max_f32 sums
 * hsum8 of 8 exps at a time in double; 1/sum in double, applied in float), the weights as
 * FP16, then V.w over the positions. The two products are ggml_vec_dot_f16's for a single
 * token, tinyBLAS's (`tiny`) within a batch, as llama.cpp computes them. llama.cpp pads its
 * positions with masked ones (weight 0, which adds exact zeros), so only the n_pos real ones
 * are visited. scratch: n_pos + 8 floats; acc: 32 * hd floats. */
static void attend_ggml(int hd, const float *qh, const uint16_t *K, const uint16_t *V, int kvd, int n_pos,
                        float scale, int tiny, float *scratch, float *acc, float *out) {
    const int lanes = tiny ? 8 : 32;
    float mx = -INFINITY;
    for (int p = 0; p < n_pos; p++) {
        if (p + ATT_PREFETCH < n_pos) prefetch_halves(K + (size_t)(p + ATT_PREFETCH) * kvd, hd);
        const float w = (tiny ? kq_tinyblas(K + (size_t)p * kvd, qh, hd) : kq_ggml(K + (size_t)p * kvd, qh, hd)) * scale;
        scratch[p] = w;
        mx = w > mx ? w : mx;
    }
    const int padded = (n_pos + 7) & ~7;
    int p = 0;
#if defined(PK_AVX2)
    for (; p + 8 <= n_pos; p += 8)
        _mm256_storeu_ps(scratch + p, expf8_ggml(_mm256_sub_ps(_mm256_loadu_ps(scratch + p), _mm256_set1_ps(mx))));
#endif
    for (; p < n_pos; p++) scratch[p] = expf_ggml(scratch[p] - mx);
    for (; p < padded; p++) scratch[p] = 0.0f;
    double sum = 0.0;
    for (p = 0; p < n_pos; p += 8) sum += (double)hsum8_ggml(scratch + p);
    const float inv = (float)(1.0 / sum);
    p = 0;
#if defined(PK_AVX2) /* the weights rounded to FP16 (F16C rounds to nearest even too) */
    for (; p + 8 <= n_pos; p += 8)
        _mm256_storeu_ps(scratch + p, _mm256_cvtph_ps(_mm256_cvtps_ph(
                                          _mm256_mul_ps(_mm256_loadu_ps(scratch + p), _mm256_set1_ps(inv)),
                                          _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; p < n_pos; p++) scratch[p] = round_half(scratch[p] * inv);
    memset(acc, 0, sizeof(float) * (size_t)lanes * hd);
    for (p = 0; p < n_pos; p++) {
        if (p + ATT_PREFETCH < n_pos) prefetch_halves(V + (size_t)(p + ATT_PREFETCH) * kvd, hd);
        v_accumulate(acc + (p & (lanes - 1)) * hd, scratch[p], V + (size_t)p * kvd, hd);
    }
    int d = 0;
#if defined(PK_AVX2) /* the reductions above, 8 values of d at a time */
    for (; d + 8 <= hd; d += 8) {
        __m256 a[32];
        for (int j = 0; j < lanes; j++) a[j] = _mm256_loadu_ps(acc + j * hd + d);
        __m256 r;
        if (tiny) {
            r = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6])),
                              _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7])));
        } else {
            __m256 x[8];
            for (int l = 0; l < 8; l++)
                x[l] = _mm256_add_ps(_mm256_add_ps(a[l], a[16 + l]), _mm256_add_ps(a[8 + l], a[24 + l]));
            for (int l = 0; l < 4; l++) x[l] = _mm256_add_ps(x[l], x[l + 4]);
            r = _mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3]));
        }
        _mm256_storeu_ps(out + d, r);
    }
#endif
    float l[32];
    for (; d < hd; d++) {
        for (int j = 0; j < lanes; j++) l[j] = acc[j * hd + d];
        out[d] = tiny ? hsum8_ggml(l) : reduce_f16dot(l);
    }
}

/* ------------------------------------------------------------------------------------ */
/* Thread pool                                                                           */
/*
 * n threads in all; the caller of pool_run is thread 0. A job offers n-1 slots; a worker
 * that wakes claims one (and runs fn with the slot's index), so a worker the OS has not
 * scheduled yet never holds the caller up: when the caller has finished its own share
 * (every job splits its work dynamically) it withdraws the unclaimed slots and waits only
 * for the workers that are actually running. Idle workers spin for a short while, then
 * yield, then sleep on a condition variable.
 */

typedef void (*pk_task)(void *arg, int ith, int nth);

typedef struct pk_pool pk_pool;
typedef struct {
    pk_pool *pool;
    int ith;
} pk_worker;

#define RUN_ONE (1 << 16)
#define SLOTS_MASK (RUN_ONE - 1)

struct pk_pool {
    int n;
    pthread_t *threads;
    pk_worker *workers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;   /* raised for every job */
    atomic_int state;  /* running workers * RUN_ONE + unclaimed slots */
    atomic_int sleeping;
    atomic_int stop;
    pk_task fn;
    void *arg;
};

static inline void cpu_relax(void) {
#if defined(PK_AVX2) || defined(PK_SSE2)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define PK_SPIN_SECONDS 0.0002  /* busy-wait this long for the next job ... */
#define PK_YIELD_SECONDS 0.002  /* ... then yield the CPU between looks until this */

static void claim_and_run(pk_pool *pool) {
    int s = atomic_load(&pool->state);
    while ((s & SLOTS_MASK) > 0) {
        if (atomic_compare_exchange_weak(&pool->state, &s, s - 1 + RUN_ONE)) {
            const int ith = pool->n - (s & SLOTS_MASK); /* 1 .. n-1 */
            pool->fn(pool->arg, ith, pool->n);
            atomic_fetch_sub(&pool->state, RUN_ONE);
            return;
        }
    }
}

static void *worker_main(void *p) {
    pk_worker *self = (pk_worker *)p;
    pk_pool *pool = self->pool;
    unsigned seen = 0; /* gen is 0 when the workers start; only pool_run raises it */
    for (;;) {
        unsigned g = atomic_load(&pool->gen);
        if (g == seen) {
            double start = 0.0;
            for (int spins = 0; (g = atomic_load(&pool->gen)) == seen; spins++) {
                if ((spins & 63) != 63) {
                    cpu_relax();
                    continue;
                }
                const double t = now_seconds();
                if (start == 0.0) start = t;
                if (t - start > PK_YIELD_SECONDS) break;
                if (t - start > PK_SPIN_SECONDS) sched_yield();
            }
            if (g == seen) {
                pthread_mutex_lock(&pool->mu);
                atomic_fetch_add(&pool->sleeping, 1);
                while ((g = atomic_load(&pool->gen)) == seen) pthread_cond_wait(&pool->cv, &pool->mu);
                atomic_fetch_sub(&pool->sleeping, 1);
                pthread_mutex_unlock(&pool->mu);
            }
        }
        seen = g;
        if (atomic_load(&pool->stop)) break;
        claim_and_run(pool);
    }
    return NULL;
}

static void pool_kick(pk_pool *pool) {
    atomic_fetch_add(&pool->gen, 1); /* seq_cst: pairs with the sleeper's increment */
    if (atomic_load(&pool->sleeping) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
}

/* Runs fn(arg, ith, n) on this thread (ith 0) and on up to n-1 workers; fn must split its
 * work dynamically (any thread may end up doing all of it). Returns when all are done. */
static void pool_run(pk_pool *pool, pk_task fn, void *arg) {
    if (!pool || pool->n <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store(&pool->state, pool->n - 1);
    pool_kick(pool);
    fn(arg, 0, pool->n);
    int s = atomic_load(&pool->state);
    while ((s & SLOTS_MASK) && !atomic_compare_exchange_weak(&pool->state, &s, s & ~SLOTS_MASK)) {
    }
    for (int spins = 0; atomic_load(&pool->state) != 0; spins++) {
        if (spins < 4000) cpu_relax();
        else sched_yield(); /* a worker was preempted mid-chunk: let it run */
    }
}

PK_EXPORT void pk_pool_free(pk_pool *pool) {
    if (!pool) return;
    if (pool->threads) {
        atomic_store(&pool->stop, 1);
        pool_kick(pool);
        for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    }
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool->threads);
    free(pool->workers);
    free(pool);
}

/* A pool of n threads in all (the caller's thread counts as one); NULL on failure. */
PK_EXPORT pk_pool *pk_pool_new(int n) {
    if (n < 1) n = 1;
    if (n > 256) n = 256;
    pk_pool *pool = (pk_pool *)calloc(1, sizeof(pk_pool));
    if (!pool) return NULL;
    pool->n = n;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->state, 0);
    atomic_init(&pool->sleeping, 0);
    atomic_init(&pool->stop, 0);
    if (n == 1) return pool;
    pool->threads = (pthread_t *)calloc((size_t)n, sizeof(pthread_t));
    pool->workers = (pk_worker *)calloc((size_t)n, sizeof(pk_worker));
    if (!pool->threads || !pool->workers) {
        pk_pool_free(pool);
        return NULL;
    }
    for (int i = 1; i < n; i++) {
        pool->workers[i].pool = pool;
        pool->workers[i].ith = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, &pool->workers[i]) != 0) {
            pool->n = i; /* join the ones started */
            pk_pool_free(pool);
            return NULL;
        }
    }
    return pool;
}

PK_EXPORT int pk_pool_threads(const pk_pool *pool) { return pool ? pool->n : 1; }

/* ------------------------------------------------------------------------------------ */
/* Matrix x activations, rows split across the pool in dynamic chunks                    */

typedef struct {
    const uint8_t *data;
    int type;
    int64_t n_cols, n_rows, row_bytes;
} pk_mat;

typedef struct {
    const pk_mat *w;
    float *y;     /* y[t * ldy + r] */
    int64_t ldy;
    int add;      /* accumulate into y */
} mm_out;

#define MM_MAX_OUT 3
#define MM_MAX_TOK 64

typedef struct {
    mm_out outs[MM_MAX_OUT];
    int n_outs;
    act_t a;
    int n_tok;
    int use_qa;   /* quantized activations available in a */
    int swiglu;   /* outs[0] = gate, outs[1] = up: outs[0].y = silu(gate) * up */
    int64_t chunk;
    int64_t n_chunks[MM_MAX_OUT];
    int64_t total_chunks;
    atomic_llong next;
} mm_job;

/* out[i] = row r of w . token t0 + i, for i < nt */
static inline void row_dots(const pk_mat *w, int64_t r, const act_t *a, int t0, int nt, int use_qa, float *out) {
    const uint8_t *row = w->data + r * w->row_bytes;
    if (use_qa && type_has_qa(w->type)) {
        dot_qa(w->type, row, a, t0, nt, out);
        return;
    }
    for (int i = 0; i < nt; i++) out[i] = dot_float(w->type, row, a->f + (t0 + i) * a->n, a->n);
}

/* rows r0 .. r0+nr-1 of w . tokens t0 .. t0+nt-1: out[(r - r0) * MM_MAX_TOK + i] */
static inline void tile_dots(const pk_mat *w, int64_t r0, int nr, const act_t *a, int t0, int nt, int use_qa,
                             float *out) {
    if (use_qa && type_has_qa(w->type) == 8) {
        q8_dots(w->type, w->data + r0 * w->row_bytes, w->row_bytes, nr, a, t0, nt, out, MM_MAX_TOK);
        return;
    }
    for (int r = 0; r < nr; r++) row_dots(w, r0 + r, a, t0, nt, use_qa, out + r * MM_MAX_TOK);
}

#define MM_ROWS 16 /* rows per tile: a tile of rows and 8 tokens stays in L1 */
#define MM_TOKS 8

static void mm_task(void *arg, int ith, int nth) {
    (void)ith;
    (void)nth;
    mm_job *job = (mm_job *)arg;
    float g[MM_ROWS * MM_MAX_TOK], u[MM_ROWS * MM_MAX_TOK];
    const int nt = job->n_tok;
    for (;;) {
        int64_t c = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (c >= job->total_chunks) break;
        int o = 0;
        while (c >= job->n_chunks[o]) c -= job->n_chunks[o++];
        const mm_out *out = &job->outs[o];
        const pk_mat *w = out->w;
        const int64_t r0 = c * job->chunk;
        const int64_t r1 = r0 + job->chunk < w->n_rows ? r0 + job->chunk : w->n_rows;
        for (int64_t rb = r0; rb < r1; rb += MM_ROWS) {
            const int64_t re = rb + MM_ROWS < r1 ? rb + MM_ROWS : r1;
            for (int t0 = 0; t0 < nt; t0 += MM_TOKS) {
                const int tn = nt - t0 < MM_TOKS ? nt - t0 : MM_TOKS;
                tile_dots(w, rb, (int)(re - rb), &job->a, t0, tn, job->use_qa, g + t0);
                if (job->swiglu) tile_dots(job->outs[1].w, rb, (int)(re - rb), &job->a, t0, tn, job->use_qa, u + t0);
            }
            if (job->swiglu) {
                for (int t = 0; t < nt; t++)
                    swiglu_rows(g + t, u + t, MM_MAX_TOK, rb, (int)(re - rb), w->n_rows, out->y + t * out->ldy + rb, 1);
                continue;
            }
            for (int64_t r = rb; r < re; r++) {
                const float *gr = g + (r - rb) * MM_MAX_TOK;
                if (out->add)
                    for (int t = 0; t < nt; t++) out->y[t * out->ldy + r] += gr[t];
                else
                    for (int t = 0; t < nt; t++) out->y[t * out->ldy + r] = gr[t];
            }
        }
    }
}

static void mm_run(pk_pool *pool, mm_job *job) {
    const int nth = pool ? pool->n : 1;
    int64_t total_rows = 0;
    const int n_mat = job->swiglu ? 1 : job->n_outs;
    for (int o = 0; o < n_mat; o++) total_rows += job->outs[o].w->n_rows;
    int64_t chunk = nth == 1 ? total_rows : total_rows / (nth * 8);
    chunk = chunk < MM_ROWS ? MM_ROWS : (chunk + MM_ROWS - 1) / MM_ROWS * MM_ROWS; /* whole tiles */
    job->chunk = chunk;
    job->total_chunks = 0;
    for (int o = 0; o < MM_MAX_OUT; o++) job->n_chunks[o] = 0;
    for (int o = 0; o < n_mat; o++) {
        job->n_chunks[o] = (job->outs[o].w->n_rows + chunk - 1) / chunk;
        job->total_chunks += job->n_chunks[o];
    }
    atomic_store(&job->next, 0);
    pool_run(pool, mm_task, job);
}

/* Scratch for quantized activations */
typedef struct {
    int16_t *q;
    float *d, *s, *dT, *sT;
    int8_t *q8;
    float *d8, *s8;
} qabuf;

static int qabuf_alloc(qabuf *b, int64_t n) {
    b->q = (int16_t *)malloc(sizeof(int16_t) * (size_t)n + 64);
    b->d = (float *)malloc(sizeof(float) * (size_t)(n / 32 + 1));
    b->s = (float *)malloc(sizeof(float) * (size_t)(n / 32 + 1));
    b->dT = (float *)malloc(sizeof(float) * (size_t)(n / 32 + 8));
    b->sT = (float *)malloc(sizeof(float) * (size_t)(n / 32 + 8));
    b->q8 = (int8_t *)malloc((size_t)n + 64);
    b->d8 = (float *)malloc(sizeof(float) * (size_t)(n / 32 + 1));
    b->s8 = (float *)malloc(sizeof(float) * (size_t)(n / 32 + 1));
    return b->q && b->d && b->s && b->dT && b->sT && b->q8 && b->d8 && b->s8;
}

static void qabuf_free(qabuf *b) {
    free(b->q);
    free(b->d);
    free(b->s);
    free(b->dT);
    free(b->sT);
    free(b->q8);
    free(b->d8);
    free(b->s8);
    memset(b, 0, sizeof *b);
}

/* quantizes nt rows of n floats into qb, to 16-bit blocks if need16, to ggml's 8-bit
 * blocks if need8, and points a at them */
static void quantize_acts(qabuf *qb, const float *x, int nt, int64_t n, act_t *a, int need16, int need8) {
    const int64_t nb = n / 32;
    a->n = n;
    a->n_tok = nt;
    if (need8) {
        for (int t = 0; t < nt; t++) quantize_q8(x + t * n, n, qb->q8 + t * n, qb->d8 + t * nb, qb->s8 + t * nb);
        a->q8 = qb->q8;
        a->d8 = qb->d8;
        a->s8 = qb->s8;
    }
    if (!need16) return;
    for (int t = 0; t < nt; t++) quantize_act(x + t * n, n, qb->q + t * n, qb->d + t * nb, qb->s + t * nb);
    if (nt >= 8)
        for (int64_t b = 0; b < nb; b++)
            for (int t = 0; t < nt; t++) {
                qb->dT[b * nt + t] = qb->d[t * nb + b];
                qb->sT[b * nt + t] = qb->s[t * nb + b];
            }
    a->q = qb->q;
    a->d = qb->d;
    a->s = qb->s;
    a->dT = qb->dT;
    a->sT = qb->sT;
}

/*
 * y[t * n_rows + r] = row r of the matrix w (type, n_cols, n_rows) . x[t * n_cols ...]
 * for t < n_tok. quantize_x: 1 = quantize the activations for the types that have an
 * integer kernel (to 8 bits, ggml's arithmetic, for Q4_1 and Q8_0; to 16 bits for the
 * others), 0 = float activations. Returns 0, or -1 for bad arguments.
 */
PK_EXPORT int pk_matmul(pk_pool *pool, int type, const void *w, int64_t n_cols, int64_t n_rows,
                        const float *x, int n_tok, float *y, int quantize_x) {
    const int bs = type_block(type, NULL);
    if (!bs || n_cols <= 0 || n_cols % bs || n_rows <= 0 || n_tok <= 0) return -1;
    pk_mat m = {(const uint8_t *)w, type, n_cols, n_rows, row_bytes(type, n_cols)};
    qabuf qb;
    memset(&qb, 0, sizeof qb);
    int rc = 0;
    for (int t0 = 0; t0 < n_tok && rc == 0; t0 += MM_MAX_TOK) {
        const int nt = n_tok - t0 < MM_MAX_TOK ? n_tok - t0 : MM_MAX_TOK;
        mm_job job;
        memset(&job, 0, sizeof(job));
        job.outs[0].w = &m;
        job.outs[0].y = y + (int64_t)t0 * n_rows;
        job.outs[0].ldy = n_rows;
        job.n_outs = 1;
        job.n_tok = nt;
        job.a.f = x + (int64_t)t0 * n_cols;
        job.a.n = n_cols;
        if (quantize_x && type_has_qa(type)) {
            if (!qb.q && !qabuf_alloc(&qb, n_cols * nt)) {
                rc = -2;
                break;
            }
            quantize_acts(&qb, job.a.f, nt, n_cols, &job.a, type_has_qa(type) == 16, type_has_qa(type) == 8);
            job.use_qa = 1;
        }
        mm_run(pool, &job);
    }
    qabuf_free(&qb);
    return rc;
}

PK_EXPORT int pk_matvec(pk_pool *pool, int type, const void *w, int64_t n_cols, int64_t n_rows,
                        const float *x, float *y, int quantize_x) {
    return pk_matmul(pool, type, w, n_cols, n_rows, x, 1, y, quantize_x);
}

/* Quantizes n floats (n a multiple of 32) as the integer kernels do, for tests. */
PK_EXPORT int pk_quantize_act(const float *x, int64_t n, int16_t *q, float *d, float *s) {
    if (n <= 0 || n % 32) return -1;
    quantize_act(x, n, q, d, s);
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* The LLaMA forward pass                                                                */

enum { HP_N_LAYER, HP_N_EMBD, HP_N_FF, HP_N_HEAD, HP_N_HEAD_KV, HP_HEAD_DIM, HP_N_VOCAB,
       HP_N_CTX, HP_ROPE_DIM, HP_ROPE_NEOX, HP_COUNT };
enum { FP_ROPE_BASE, FP_ROPE_SCALE, FP_NORM_EPS, FP_COUNT };
/* tensor slots: 0 token_embd, 1 output_norm, 2 output (may equal token_embd), then per layer: */
enum { L_ATTN_NORM, L_Q, L_K, L_V, L_O, L_FFN_NORM, L_GATE, L_UP, L_DOWN, L_COUNT };
#define SLOTS_GLOBAL 3

typedef struct {
    pk_mat q, k, v, o, gate, up, down;
    float *attn_norm, *ffn_norm; /* dequantized copies (n_embd floats each) */
} pk_layer;

typedef struct pk_model {
    int n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, n_vocab, n_ctx, rope_dim, rope_neox;
    int q_dim, kv_dim, max_batch;
    float eps;
    void *map;
    size_t map_size;
    pk_mat tok_embd, output;
    float *output_norm;
    pk_layer *layers;
    float *rope_cos, *rope_sin; /* n_ctx * rope_dim/2 */
    pk_pool *pool;
    /* scratch, max_batch rows each */
    float *x, *xb, *q, *k, *v, *att, *hb;
    qabuf qb;
    float *scores; /* attention scratch, ATT_SCRATCH(m) floats per thread */
} pk_model;

static void set_err(char *err, int len, const char *msg) {
    if (err && len > 0) {
        strncpy(err, msg, (size_t)len - 1);
        err[len - 1] = 0;
    }
}

PK_EXPORT void pk_model_free(pk_model *m) {
    if (!m) return;
    if (m->layers) {
        for (int l = 0; l < m->n_layer; l++) {
            free(m->layers[l].attn_norm);
            free(m->layers[l].ffn_norm);
        }
    }
    free(m->layers);
    free(m->output_norm);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->x);
    free(m->xb);
    free(m->q);
    free(m->k);
    free(m->v);
    free(m->att);
    free(m->hb);
    free(m->scores);
    qabuf_free(&m->qb);
    pk_pool_free(m->pool);
    if (m->map) munmap(m->map, m->map_size);
    free(m);
}

static int bind_mat(pk_model *m, pk_mat *w, int64_t off, int type, int64_t ne0, int64_t ne1,
                    int64_t want0, int64_t want1, char *err, int elen, const char *what) {
    char buf[200];
    const int bs = type_block(type, NULL);
    if (!bs) {
        snprintf(buf, sizeof buf, "%s: type %d has no kernel", what, type);
        set_err(err, elen, buf);
        return 0;
    }
    if (ne0 != want0 || ne1 != want1 || ne0 % bs) {
        snprintf(buf, sizeof buf, "%s: shape (%lld, %lld), expected (%lld, %lld)", what,
                 (long long)ne0, (long long)ne1, (long long)want0, (long long)want1);
        set_err(err, elen, buf);
        return 0;
    }
    const int64_t rb = row_bytes(type, ne0);
    if (off < 0 || (uint64_t)off > m->map_size || (uint64_t)(rb * ne1) > m->map_size - (uint64_t)off) {
        snprintf(buf, sizeof buf, "%s: data runs past the end of the file", what);
        set_err(err, elen, buf);
        return 0;
    }
    w->data = (const uint8_t *)m->map + off;
    w->type = type;
    w->n_cols = ne0;
    w->n_rows = ne1;
    w->row_bytes = rb;
    return 1;
}

static float *load_vector(pk_model *m, int64_t off, int type, int64_t ne0, int64_t ne1, int64_t want,
                          char *err, int elen, const char *what) {
    pk_mat w;
    if (!bind_mat(m, &w, off, type, ne0, ne1, want, 1, err, elen, what)) return NULL;
    float *v = (float *)malloc(sizeof(float) * (size_t)want);
    if (!v) {
        set_err(err, elen, "out of memory");
        return NULL;
    }
    dequantize_row(type, w.data, v, want);
    return v;
}

/*
 * A model evaluator over the GGUF file at `path` (mapped read-only here; weights are
 * used in place). hp: HP_COUNT integers (n_layer, n_embd, n_ff, n_head, n_head_kv,
 * head_dim, n_vocab, n_ctx, rope_dim, rope_neox); fp: FP_COUNT doubles (rope_base,
 * rope_scale, norm_eps); freq_factors: rope_dim/2 floats or NULL. The tensor table has
 * n_slots = 3 + 9 * n_layer entries in the order token_embd, output_norm, output, then per
 * layer attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
 * ffn_down: absolute file offset, ggml type, ne0 (row length) and ne1 (rows; 1 for
 * vectors). NULL on failure with a message in err.
 */
PK_EXPORT pk_model *pk_model_new(const char *path, const int64_t *hp, int n_hp, const double *fp, int n_fp,
                                 const float *freq_factors, const int64_t *offsets, const int32_t *types,
                                 const int64_t *ne0, const int64_t *ne1, int n_slots, int n_threads,
                                 int max_batch, char *err, int err_len) {
    if (n_hp != HP_COUNT || n_fp != FP_COUNT) {
        set_err(err, err_len, "wrong number of hyper-parameters");
        return NULL;
    }
    pk_model *m = (pk_model *)calloc(1, sizeof(pk_model));
    if (!m) {
        set_err(err, err_len, "out of memory");
        return NULL;
    }
    m->n_layer = (int)hp[HP_N_LAYER];
    m->n_embd = (int)hp[HP_N_EMBD];
    m->n_ff = (int)hp[HP_N_FF];
    m->n_head = (int)hp[HP_N_HEAD];
    m->n_head_kv = (int)hp[HP_N_HEAD_KV];
    m->head_dim = (int)hp[HP_HEAD_DIM];
    m->n_vocab = (int)hp[HP_N_VOCAB];
    m->n_ctx = (int)hp[HP_N_CTX];
    m->rope_dim = (int)hp[HP_ROPE_DIM];
    m->rope_neox = (int)hp[HP_ROPE_NEOX];
    m->eps = (float)fp[FP_NORM_EPS];
    m->q_dim = m->n_head * m->head_dim;
    m->kv_dim = m->n_head_kv * m->head_dim;
    m->max_batch = max_batch < 1 ? 1 : max_batch > MM_MAX_TOK ? MM_MAX_TOK : max_batch;
    if (m->n_layer < 1 || m->n_embd < 1 || m->n_ff < 1 || m->n_head < 1 || m->n_head_kv < 1 ||
        m->head_dim < 1 || m->n_vocab < 1 || m->n_ctx < 1 || m->n_head % m->n_head_kv ||
        m->rope_dim > m->head_dim || m->rope_dim % 2 || n_slots != SLOTS_GLOBAL + L_COUNT * m->n_layer) {
        set_err(err, err_len, "inconsistent hyper-parameters");
        free(m);
        return NULL;
    }
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        set_err(err, err_len, "cannot open the model file");
        free(m);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0) {
        close(fd);
        set_err(err, err_len, "cannot stat the model file");
        free(m);
        return NULL;
    }
    m->map_size = (size_t)st.st_size;
    int flags = MAP_SHARED;
#ifdef MAP_POPULATE
    flags |= MAP_POPULATE; /* page tables filled now, not on the first token */
#endif
    m->map = mmap(NULL, m->map_size, PROT_READ, flags, fd, 0);
    close(fd);
    if (m->map == MAP_FAILED) {
        m->map = NULL;
        set_err(err, err_len, "cannot map the model file");
        pk_model_free(m);
        return NULL;
    }
    const int E = m->n_embd, F = m->n_ff, V = m->n_vocab;
    if (!bind_mat(m, &m->tok_embd, offsets[0], types[0], ne0[0], ne1[0], E, V, err, err_len, "token_embd") ||
        !(m->output_norm = load_vector(m, offsets[1], types[1], ne0[1], ne1[1], E, err, err_len, "output_norm")) ||
        !bind_mat(m, &m->output, offsets[2], types[2], ne0[2], ne1[2], E, V, err, err_len, "output")) {
        pk_model_free(m);
        return NULL;
    }
    m->layers = (pk_layer *)calloc((size_t)m->n_layer, sizeof(pk_layer));
    if (!m->layers) {
        set_err(err, err_len, "out of memory");
        pk_model_free(m);
        return NULL;
    }
    for (int l = 0; l < m->n_layer; l++) {
        pk_layer *L = &m->layers[l];
        const int s = SLOTS_GLOBAL + L_COUNT * l;
#define SLOT(k) offsets[s + k], types[s + k], ne0[s + k], ne1[s + k]
        if (!(L->attn_norm = load_vector(m, SLOT(L_ATTN_NORM), E, err, err_len, "attn_norm")) ||
            !bind_mat(m, &L->q, SLOT(L_Q), E, m->q_dim, err, err_len, "attn_q") ||
            !bind_mat(m, &L->k, SLOT(L_K), E, m->kv_dim, err, err_len, "attn_k") ||
            !bind_mat(m, &L->v, SLOT(L_V), E, m->kv_dim, err, err_len, "attn_v") ||
            !bind_mat(m, &L->o, SLOT(L_O), m->q_dim, E, err, err_len, "attn_output") ||
            !(L->ffn_norm = load_vector(m, SLOT(L_FFN_NORM), E, err, err_len, "ffn_norm")) ||
            !bind_mat(m, &L->gate, SLOT(L_GATE), E, F, err, err_len, "ffn_gate") ||
            !bind_mat(m, &L->up, SLOT(L_UP), E, F, err, err_len, "ffn_up") ||
            !bind_mat(m, &L->down, SLOT(L_DOWN), F, E, err, err_len, "ffn_down")) {
            pk_model_free(m);
            return NULL;
        }
#undef SLOT
    }
    /* RoPE table, computed as ggml computes it */
    const int half = m->rope_dim / 2;
    m->rope_cos = (float *)malloc(sizeof(float) * (size_t)m->n_ctx * (half ? half : 1));
    m->rope_sin = (float *)malloc(sizeof(float) * (size_t)m->n_ctx * (half ? half : 1));
    if (!m->rope_cos || !m->rope_sin) {
        set_err(err, err_len, "out of memory");
        pk_model_free(m);
        return NULL;
    }
    for (int p = 0; p < m->n_ctx; p++)
        rope_table_ggml(m->rope_cos + (size_t)p * half, m->rope_sin + (size_t)p * half, p, half, m->rope_dim,
                        (float)fp[FP_ROPE_BASE], (float)fp[FP_ROPE_SCALE], freq_factors);
    const size_t B = (size_t)m->max_batch;
    int64_t widest = E > F ? E : F;
    if (m->q_dim > widest) widest = m->q_dim;
    m->x = (float *)malloc(sizeof(float) * B * E);
    m->xb = (float *)malloc(sizeof(float) * B * (size_t)widest);
    m->q = (float *)malloc(sizeof(float) * B * m->q_dim);
    m->k = (float *)malloc(sizeof(float) * B * m->kv_dim);
    m->v = (float *)malloc(sizeof(float) * B * m->kv_dim);
    m->att = (float *)malloc(sizeof(float) * B * m->q_dim);
    m->hb = (float *)malloc(sizeof(float) * B * F);
    m->pool = pk_pool_new(n_threads);
    m->scores = (float *)malloc(sizeof(float) * (size_t)(m->pool ? m->pool->n : 1) * ATT_SCRATCH(m));
    if (!m->x || !m->xb || !m->q || !m->k || !m->v || !m->att || !m->hb || !m->pool || !m->scores ||
        !qabuf_alloc(&m->qb, (int64_t)B * widest)) {
        set_err(err, err_len, "out of memory (scratch or threads)");
        pk_model_free(m);
        return NULL;
    }
    return m;
}

PK_EXPORT int pk_model_threads(const pk_model *m) { return m && m->pool ? m->pool->n : 1; }

static void rope(const pk_model *m, float *vec, int n_heads, int pos) {
    const int half = m->rope_dim / 2;
    const float *c = m->rope_cos + (size_t)pos * half, *sn = m->rope_sin + (size_t)pos * half;
    for (int h = 0; h < n_heads; h++) {
        float *v = vec + h * m->head_dim;
        for (int i = 0; i < half; i++) {
            if (m->rope_neox) rotate_ggml(v + i, v + i + half, c[i], sn[i]);
            else rotate_ggml(v + 2 * i, v + 2 * i + 1, c[i], sn[i]);
        }
    }
}

static void store_half(uint16_t *dst, const float *src, int n) {
    int i = 0;
#if defined(PK_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = float_to_half_sw(src[i]);
}

/* FP16 conversions as the KV cache does them (F16C where compiled in), for tests */
PK_EXPORT void pk_f32_to_f16(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 1 << 20) store_half(out + i, x + i, (int)(n - i < (1 << 20) ? n - i : 1 << 20));
}

typedef struct {
    pk_model *m;
    const uint16_t *K, *V; /* this layer's key and value rows */
    int n_tok, pos0;
    int n_tiny; /* tokens 0 .. n_tiny-1 attend in tinyBLAS order (see attend_ggml) */
    atomic_int next;
} attn_job;

static void attn_task(void *arg, int ith, int nth) {
    (void)nth;
    attn_job *job = (attn_job *)arg;
    pk_model *m = job->m;
    const int hd = m->head_dim, group = m->n_head / m->n_head_kv, kvd = m->kv_dim;
    float *qh = m->scores + (size_t)ith * ATT_SCRATCH(m), *acc = qh + hd, *scratch = acc + 32 * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const int total = job->n_tok * m->n_head;
    for (;;) {
        const int task = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (task >= total) break;
        const int t = task / m->n_head, h = task % m->n_head;
        const int n_pos = job->pos0 + t + 1;
        const float *q = m->q + (size_t)t * m->q_dim + h * hd;
        const int kv_off = (h / group) * hd;
        float *out = m->att + (size_t)t * m->q_dim + h * hd;
        for (int i = 0; i < hd; i++) qh[i] = round_half(q[i]);
        attend_ggml(hd, qh, job->K + kv_off, job->V + kv_off, kvd, n_pos, scale, t < job->n_tiny, scratch, acc, out);
    }
}

/* 1 if one of the matrices (b and c may be NULL) has an integer kernel taking `bits` */
static int any_qa(int bits, const pk_mat *a, const pk_mat *b, const pk_mat *c) {
    return type_has_qa(a->type) == bits || (b && type_has_qa(b->type) == bits) || (c && type_has_qa(c->type) == bits);
}

/* matmul of up to three matrices (same input) with the input x (n_tok rows of n) */
static void run_mm(pk_model *m, const float *x, int n_tok, int64_t n, const pk_mat *w0, float *y0, int64_t ld0,
                   const pk_mat *w1, float *y1, int64_t ld1, const pk_mat *w2, float *y2, int64_t ld2, int add,
                   int swiglu) {
    mm_job job;
    memset(&job, 0, sizeof(job));
    job.n_tok = n_tok;
    job.a.f = x;
    job.a.n = n;
    job.swiglu = swiglu;
    const int need16 = any_qa(16, w0, w1, w2), need8 = any_qa(8, w0, w1, w2);
    job.use_qa = (n % 32 == 0) && (need16 || need8);
    if (job.use_qa) quantize_acts(&m->qb, x, n_tok, n, &job.a, need16, need8);
    const pk_mat *ws[3] = {w0, w1, w2};
    float *ys[3] = {y0, y1, y2};
    const int64_t lds[3] = {ld0, ld1, ld2};
    for (int i = 0; i < 3 && ws[i]; i++) {
        job.outs[i].w = ws[i];
        job.outs[i].y = ys[i];
        job.outs[i].ldy = lds[i];
        job.outs[i].add = add;
        job.n_outs = i + 1;
    }
    mm_run(m->pool, &job);
}

/* seconds spent per phase of the forward pass (for profiling; see pk_profile) */
enum { PH_QKV, PH_ATTN, PH_WO, PH_FFN_UP, PH_FFN_DOWN, PH_OUTPUT, PH_OTHER, PH_COUNT };
static double pk_phase_seconds[PH_COUNT];
static int pk_profiling;

PK_EXPORT void pk_profile(int on, double *out) {
    if (out)
        for (int i = 0; i < PH_COUNT; i++) out[i] = pk_phase_seconds[i];
    pk_profiling = on;
    memset(pk_phase_seconds, 0, sizeof pk_phase_seconds);
}

static inline void phase(double *t, int which) {
    if (!pk_profiling) return;
    const double now = now_seconds();
    pk_phase_seconds[which] += now - *t;
    *t = now;
}

/* tokens 0 .. n_tiny-1 of the B attend in tinyBLAS order, the others as single tokens */
static void forward_batch(pk_model *m, const int32_t *tokens, int B, int n_tiny, int pos0, uint8_t *kv,
                          float *logits, int all_logits) {
    const int E = m->n_embd, F = m->n_ff, QD = m->q_dim, KVD = m->kv_dim;
    const size_t layer_bytes = (size_t)m->n_ctx * KVD * 2;
    double t = pk_profiling ? now_seconds() : 0.0;
    for (int i = 0; i < B; i++)
        dequantize_row(m->tok_embd.type, m->tok_embd.data + (int64_t)tokens[i] * m->tok_embd.row_bytes,
                       m->x + (size_t)i * E, E);
    for (int l = 0; l < m->n_layer; l++) {
        const pk_layer *L = &m->layers[l];
        uint16_t *K = (uint16_t *)(kv + (size_t)(2 * l) * layer_bytes);
        uint16_t *V = (uint16_t *)(kv + (size_t)(2 * l + 1) * layer_bytes);
        for (int i = 0; i < B; i++) rmsnorm_ggml(m->x + (size_t)i * E, L->attn_norm, m->xb + (size_t)i * E, E, m->eps);
        phase(&t, PH_OTHER);
        run_mm(m, m->xb, B, E, &L->q, m->q, QD, &L->k, m->k, KVD, &L->v, m->v, KVD, 0, 0);
        phase(&t, PH_QKV);
        for (int i = 0; i < B; i++) {
            const int pos = pos0 + i;
            rope(m, m->q + (size_t)i * QD, m->n_head, pos);
            rope(m, m->k + (size_t)i * KVD, m->n_head_kv, pos);
            store_half(K + (size_t)pos * KVD, m->k + (size_t)i * KVD, KVD);
            store_half(V + (size_t)pos * KVD, m->v + (size_t)i * KVD, KVD);
        }
        attn_job aj;
        aj.m = m;
        aj.K = K;
        aj.V = V;
        aj.n_tok = B;
        aj.pos0 = pos0;
        aj.n_tiny = n_tiny;
        atomic_init(&aj.next, 0);
        pool_run(m->pool, attn_task, &aj);
        phase(&t, PH_ATTN);
        run_mm(m, m->att, B, QD, &L->o, m->x, E, NULL, NULL, 0, NULL, NULL, 0, 1, 0);
        phase(&t, PH_WO);
        for (int i = 0; i < B; i++) rmsnorm_ggml(m->x + (size_t)i * E, L->ffn_norm, m->xb + (size_t)i * E, E, m->eps);
        run_mm(m, m->xb, B, E, &L->gate, m->hb, F, &L->up, NULL, F, NULL, NULL, 0, 0, 1);
        phase(&t, PH_FFN_UP);
        run_mm(m, m->hb, B, F, &L->down, m->x, E, NULL, NULL, 0, NULL, NULL, 0, 1, 0);
        phase(&t, PH_FFN_DOWN);
    }
    if (!logits) return;
    const int first = all_logits ? 0 : B - 1, n = B - first;
    for (int i = first; i < B; i++)
        rmsnorm_ggml(m->x + (size_t)i * E, m->output_norm, m->xb + (size_t)(i - first) * E, E, m->eps);
    run_mm(m, m->xb, n, E, &m->output, logits, m->n_vocab, NULL, NULL, 0, NULL, NULL, 0, 0, 0);
    phase(&t, PH_OUTPUT);
}

/*
 * Evaluates n_tokens tokens at positions pos..pos+n_tokens-1, reading and writing the KV
 * cache kv (kv_bytes long, layout [layer][K, V][n_ctx][n_head_kv * head_dim] FP16).
 * logits_mode: 0 = none, 1 = the last token's n_vocab logits into logits, 2 = every
 * token's (n_tokens * n_vocab). Returns 0, or -1 bad arguments, -2 token out of range.
 * As llama.cpp (whose default batches hold up to 512 tokens) computes the attention of a
 * batch of two or more tokens in another order than that of a single token, so do we: the
 * logits of a prompt evaluated at once equal llama.cpp's for that prompt, token by token
 * they equal its token-by-token ones.
 */
PK_EXPORT int pk_forward(pk_model *m, const int32_t *tokens, int n_tokens, int pos, void *kv, int64_t kv_bytes,
                         float *logits, int logits_mode) {
    if (!m || !tokens || n_tokens < 1 || pos < 0 || pos + n_tokens > m->n_ctx || !kv) return -1;
    if (kv_bytes < (int64_t)2 * m->n_layer * m->n_ctx * m->kv_dim * 2) return -1;
    if (logits_mode && !logits) return -1;
    for (int i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= m->n_vocab) return -2;
    for (int c = 0; c < n_tokens; c += m->max_batch) {
        const int B = n_tokens - c < m->max_batch ? n_tokens - c : m->max_batch;
        const int last = c + B == n_tokens;
        float *out = NULL;
        if (logits_mode == 2) out = logits + (size_t)c * m->n_vocab;
        else if (logits_mode == 1 && last) out = logits;
        /* llama.cpp's batch of 512 holding the call's last token may hold only that token */
        const int lone_last = last && n_tokens % LLAMA_UBATCH == 1;
        const int n_tiny = m->head_dim % 8 ? 0 : B - lone_last;
        forward_batch(m, tokens + c, B, n_tiny, pos + c, (uint8_t *)kv, out, logits_mode == 2);
    }
    return 0;
}

/* the indices of the k largest of n floats, largest first and the lower index first
 * among equals (as Python's max() and a stable sort take them): greedy decoding, and
 * the next-best tokens --json tries, without Python scanning the logits. Returns how
 * many were written: min(k, n). */
PK_EXPORT int64_t pk_top(const float *x, int64_t n, int64_t k, int64_t *ids) {
    if (k > n) k = n;
    if (k <= 0) return 0;
    int64_t kept = 0; /* ids[0..kept) in order */
    for (int64_t i = 0; i < n; i++) {
        if (kept == k && !(x[i] > x[ids[k - 1]])) continue;
        int64_t j = kept < k ? kept++ : k - 1;
        for (; j > 0 && x[i] > x[ids[j - 1]]; j--) ids[j] = ids[j - 1];
        ids[j] = i;
    }
    return kept;
}
