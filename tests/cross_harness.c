/*
 * A stand-alone driver of picolm_kernels.c for builds that run under an emulator
 * (tests/test_accel.py, TestCrossBuilds: aarch64 and armv7 NEON under qemu), where no
 * Python of that architecture exists to load the library. It is compiled together with
 * the kernels (one translation unit) and static, so it needs nothing of the target.
 *
 * All numbers little-endian. It first writes pk_isa() in 16 bytes (zero-padded), then
 * answers requests read from stdin until end of file, each an int32 op and its fields:
 *   op 1, dequantize: type (int32), n (int64), nbytes (int64), the bytes
 *         -> n float32
 *   op 2, matrix times vector: type (int32), quantize_x (int32), n_cols (int64),
 *         n_rows (int64), nbytes (int64), the bytes, x (n_cols float32)
 *         -> n_rows float32 (pk_matvec on a pool of 2 threads)
 * Any failure: exit status 1.
 */
#include "../picolm_kernels/picolm_kernels.c"

#include <stdio.h>

static void read_exact(void *dst, size_t n) {
    if (n && fread(dst, 1, n, stdin) != n) exit(1);
}

static void *read_block(int64_t n) {
    if (n < 0 || n > ((int64_t)1 << 30)) exit(1);
    void *p = malloc((size_t)n + 1);
    if (!p) exit(1);
    read_exact(p, (size_t)n);
    return p;
}

int main(void) {
    char isa[16] = {0};
    strncpy(isa, pk_isa(), sizeof isa - 1);
    fwrite(isa, 1, sizeof isa, stdout);
    pk_pool *pool = pk_pool_new(2);
    int32_t op;
    while (fread(&op, sizeof op, 1, stdin) == 1) {
        int32_t type, quantize = 0;
        int64_t n, n_rows = 1, nbytes;
        read_exact(&type, sizeof type);
        if (op == 2) read_exact(&quantize, sizeof quantize);
        read_exact(&n, sizeof n);
        if (op == 2) read_exact(&n_rows, sizeof n_rows);
        read_exact(&nbytes, sizeof nbytes);
        void *data = read_block(nbytes);
        float *out = (float *)malloc((size_t)(op == 1 ? n : n_rows) * 4 + 4);
        if (!out) return 1;
        if (op == 1) {
            if (pk_dequantize(type, data, out, n) != 0) return 1;
            fwrite(out, 4, (size_t)n, stdout);
        } else if (op == 2) {
            float *x = (float *)read_block(n * 4);
            if (pk_matvec(pool, type, data, n, n_rows, x, out, quantize) != 0) return 1;
            fwrite(out, 4, (size_t)n_rows, stdout);
            free(x);
        } else {
            return 1;
        }
        free(out);
        free(data);
    }
    pk_pool_free(pool);
    return fflush(stdout) != 0;
}
