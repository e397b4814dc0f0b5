/*
 * A standalone check of lamina's kernels, for builds Python cannot load: the aarch64
 * cross-compiled kernels run it under qemu-aarch64 (tests/unit/test_native_builds.py), and
 * an x86 build runs it natively, which shows the driver itself agrees with the Python
 * tests. It is compiled together with kernels.c (one translation unit, the library's
 * flags) and checks, on small shapes that take the tails of every loop:
 *   - the matmul, fp32 and fp16 panels, against a scalar double reference; bf16 panels
 *     against doubles of the bf16-rounded inputs, within fp32's error for K additions;
 *     int8 and 4-bit blocks: each weight within half a step of its value, and the sum
 *     within fp32's error of the doubles of the dequantized weights and of the rows
 *     quantized to int8 per block of 32 (int8.h);
 *   - each matmul row's bits against the same row computed alone (batch invariance);
 *   - paged attention (GQA, a reversed block table) against a double reference, and each
 *     token's bits against the token computed alone.
 * Prints one line per check; exits 0 when all pass, 1 otherwise.
 */
#include "kernels.c"

#include <stdio.h>

static uint64_t random_state = 0x9E3779B97F4A7C15ull;

/* Uniform in [-1, 1), from a fixed xorshift sequence: the same data on every machine. */
static float uniform(void) {
    random_state ^= random_state << 13;
    random_state ^= random_state >> 7;
    random_state ^= random_state << 17;
    return (float)((double)(random_state >> 11) / (double)(1ull << 52) - 1.0);
}

static float *random_floats(long count) {
    float *values = malloc(count * sizeof *values);
    for (long i = 0; i < count; i++) values[i] = uniform();
    return values;
}

/* IEEE half bits -> float, written independently of the kernels' conversions. */
static double half_value(half_bits bits) {
    int exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
    double magnitude = exponent == 0 ? ldexp(mantissa, -24)
                                     : ldexp(1024 + mantissa, exponent - 25);
    return bits & 0x8000 ? -magnitude : magnitude;
}

static int failures = 0;

static void report(int passed, const char *what) {
    printf("%s %s\n", passed ? "ok" : "FAILED", what);
    failures += !passed;
}

/* y = x W^T + bias for x [M, K], W [N, K]: against doubles, then row by row. */
static void check_matmul(long M, long K, long N, int half) {
    float *x = random_floats(M * K), *weight = random_floats(N * K), *bias = random_floats(N);
    long panel_floats = (N + PANEL - 1) / PANEL * K * PANEL;
    void *panels = malloc(panel_floats * (half ? sizeof(half_bits) : sizeof(float)));
    if (half)
        lamina_pack_weight_f16(weight, panels, N, K);
    else
        lamina_pack_weight(weight, panels, N, K);
    float *y = malloc(M * N * sizeof *y), *row = malloc(N * sizeof *row);
    lamina_matmul(x, K, panels, half, bias, y, M, K, N);
    int close = 1, same_bits = 1;
    double tolerance = 1e-5 * sqrt((double)K);
    for (long m = 0; m < M; m++) {
        for (long n = 0; n < N; n++) {
            double expected = bias[n];
            for (long k = 0; k < K; k++) {
                /* Panel p holds columns 64p..64p+63, one row of 64 per k. */
                long at = (n / PANEL * K + k) * PANEL + n % PANEL;
                double w = half ? half_value(((half_bits *)panels)[at]) : weight[n * K + k];
                if (!half && ((float *)panels)[at] != weight[n * K + k]) close = 0;
                expected += (double)x[m * K + k] * w;
            }
            double error = fabs(y[m * N + n] - expected);
            if (!(error <= tolerance + 1e-5 * fabs(expected))) close = 0;
        }
        lamina_matmul(x + m * K, K, panels, half, bias, row, 1, K, N);
        if (memcmp(row, y + m * N, N * sizeof *row) != 0) same_bits = 0;
    }
    char what[160];
    snprintf(what, sizeof what, "matmul %s %ldx%ldx%ld: matches doubles", half ? "fp16" : "fp32",
             M, K, N);
    report(close, what);
    snprintf(what, sizeof what, "matmul %s %ldx%ldx%ld: each row's bits alone", half ? "fp16" : "fp32",
             M, K, N);
    report(same_bits, what);
    free(x), free(weight), free(bias), free(panels), free(y), free(row);
}

/* float -> the nearest bf16 (ties to even) as a double; denormals to zero, as the kernels
 * round them (bf16.h). Written apart from the kernels' vector rounding. */
static double bf16_value(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7f800000u) == 0) return 0.0;
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    float rounded;
    memcpy(&rounded, &bits, sizeof rounded);
    return rounded;
}

/* bf16 panels (K-pairs): each product of rounded inputs is exact in fp32, so the error
 * is at most (K + 1) u of the absolute sum; then each row's bits alone. */
static void check_matmul_bf16(long M, long K, long N) {
    float *x = random_floats(M * K), *weight = random_floats(N * K), *bias = random_floats(N);
    long pairs = (K + 1) / 2;
    uint16_t *panels = malloc((N + PANEL - 1) / PANEL * pairs * PANEL * 2 * sizeof *panels);
    lamina_pack_weight_bf16(weight, panels, N, K);
    float *y = malloc(M * N * sizeof *y), *row = malloc(N * sizeof *row);
    lamina_matmul(x, K, panels, WEIGHTS_BF16, bias, y, M, K, N);
    int close = 1, same_bits = 1;
    for (long m = 0; m < M; m++) {
        for (long n = 0; n < N; n++) {
            double expected = bias[n], magnitude = fabs(bias[n]);
            for (long k = 0; k < K; k++) {
                /* Panel p, pair k / 2: columns 64p..64p+63, two values (k even, odd) each. */
                long at = ((n / PANEL * pairs + k / 2) * PANEL + n % PANEL) * 2 + k % 2;
                double w = bf16_value(weight[n * K + k]);
                uint32_t packed = (uint32_t)panels[at] << 16;
                float stored;
                memcpy(&stored, &packed, sizeof stored);
                if (stored != w) close = 0;
                expected += bf16_value(x[m * K + k]) * w;
                magnitude += fabs(bf16_value(x[m * K + k]) * w);
            }
            double bound = (K + 1) * ldexp(magnitude, -24);
            if (!(fabs(y[m * N + n] - expected) <= bound)) close = 0;
        }
        lamina_matmul(x + m * K, K, panels, WEIGHTS_BF16, bias, row, 1, K, N);
        if (memcmp(row, y + m * N, N * sizeof *row) != 0) same_bits = 0;
    }
    char what[160];
    snprintf(what, sizeof what, "matmul bf16 %ldx%ldx%ld: matches doubles", M, K, N);
    report(close, what);
    snprintf(what, sizeof what, "matmul bf16 %ldx%ldx%ld: each row's bits alone", M, K, N);
    report(same_bits, what);
    free(x), free(weight), free(bias), free(panels), free(y), free(row);
}

/* The weight of column n at k in int8 or 4-bit blocks (int8.h, int4.h), dequantized
 * as the kernel does it (q * scale, or q * scale + minimum in one rounding); its scale
 * (the quantization step) in *step. Written apart from the kernels' vector code. */
static float block_weight(const uint8_t *panels, int kind, long n, long k, long K, float *step) {
    long blocks = K / I8_BLOCK, row_bytes = kind == WEIGHTS_I8 ? PANEL : PANEL / 2;
    long block_bytes = kind == WEIGHTS_I8 ? I8_BLOCK_BYTES : I4_BLOCK_BYTES;
    const uint8_t *block = panels + (n / PANEL * blocks + k / I8_BLOCK) * block_bytes;
    const uint8_t *tail = block + I8_BLOCK * row_bytes; /* the scales, then any minima */
    float scale, least = 0.0f;
    memcpy(&scale, tail + n % PANEL * 4, sizeof scale);
    *step = scale;
    long kk = k % I8_BLOCK, c = n % PANEL;
    if (kind == WEIGHTS_I8) /* byte (k / 4, column, k % 4) holds q + 128 */
        return (float)(block[kk / 4 * 4 * PANEL + c * 4 + kk % 4] - 128) * scale;
    memcpy(&least, tail + (PANEL + c) * 4, sizeof least);
    uint8_t byte = block[kk / 8 * 4 * PANEL + c * 4 + kk % 4]; /* low nibble: k % 8 < 4 */
    int q = kk % 8 < 4 ? byte & 15 : byte >> 4;
    return (float)((double)q * scale + least);
}

/* x [M, K] as the int8 and 4-bit matmuls see it: per row and block of 32, scale = the
 * largest |x| / 127, each value round(x * (1 / scale)) * scale (in doubles). */
static double *quantized_rows(const float *x, long M, long K) {
    double *out = malloc(M * K * sizeof *out);
    for (long start = 0; start < M * K; start += I8_BLOCK) {
        float largest = 0.0f;
        for (long i = start; i < start + I8_BLOCK; i++)
            largest = fabsf(x[i]) > largest ? fabsf(x[i]) : largest;
        float scale = largest / 127.0f, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
        for (long i = start; i < start + I8_BLOCK; i++)
            out[i] = (double)nearbyintf(x[i] * inverse) * scale;
    }
    return out;
}

/* int8 or 4-bit blocks: each weight within half a step of its value; the kernel's sum
 * within (K + 1) u of the absolute sum of the products with the dequantized weights;
 * then each row's bits alone. */
static void check_matmul_blocks(long M, long K, long N, int kind) {
    float *x = random_floats(M * K), *weight = random_floats(N * K), *bias = random_floats(N);
    long block_bytes = kind == WEIGHTS_I8 ? I8_BLOCK_BYTES : I4_BLOCK_BYTES;
    uint8_t *panels = malloc((N + PANEL - 1) / PANEL * (K / I8_BLOCK) * block_bytes);
    if (kind == WEIGHTS_I8)
        lamina_pack_weight_i8(weight, panels, N, K);
    else
        lamina_pack_weight_i4(weight, panels, N, K);
    float *y = malloc(M * N * sizeof *y), *row = malloc(N * sizeof *row);
    double *xq = quantized_rows(x, M, K);
    lamina_matmul(x, K, panels, kind, bias, y, M, K, N);
    int close = 1, same_bits = 1;
    for (long m = 0; m < M; m++) {
        for (long n = 0; n < N; n++) {
            double expected = bias[n], magnitude = fabs(bias[n]);
            for (long k = 0; k < K; k++) {
                float step, w = block_weight(panels, kind, n, k, K, &step);
                if (!(fabs(w - weight[n * K + k]) <= 0.5 * step * (1 + 1e-4) + 1e-6)) close = 0;
                expected += xq[m * K + k] * w;
                magnitude += fabs(xq[m * K + k] * w);
            }
            double bound = (K + 1) * ldexp(magnitude, -24);
            if (!(fabs(y[m * N + n] - expected) <= bound)) close = 0;
        }
        lamina_matmul(x + m * K, K, panels, kind, bias, row, 1, K, N);
        if (memcmp(row, y + m * N, N * sizeof *row) != 0) same_bits = 0;
    }
    const char *name = kind == WEIGHTS_I8 ? "int8" : "int4";
    char what[160];
    snprintf(what, sizeof what, "matmul %s %ldx%ldx%ld: matches doubles", name, M, K, N);
    report(close, what);
    snprintf(what, sizeof what, "matmul %s %ldx%ldx%ld: each row's bits alone", name, M, K, N);
    report(same_bits, what);
    free(x), free(weight), free(bias), free(panels), free(y), free(row), free(xq);
}

/* One sequence of L tokens, all queried (a prompt), causal, keys in blocks of 8 stored in
 * reverse order; heads share kv heads in groups. */
static void check_attention(long L, long heads, long kv_heads, long dim) {
    const long block = 8, blocks = (L + block - 1) / block;
    float *query = random_floats(L * heads * dim);
    float *keys = random_floats(kv_heads * blocks * block * dim);
    float *values = random_floats(kv_heads * blocks * block * dim);
    int32_t *table = malloc(blocks * sizeof *table), *seq = calloc(L, sizeof *seq);
    int32_t *num_keys = malloc(L * sizeof *num_keys);
    for (long b = 0; b < blocks; b++) table[b] = (int32_t)(blocks - 1 - b);
    for (long t = 0; t < L; t++) num_keys[t] = (int32_t)(t + 1);
    float *out = malloc(L * heads * dim * sizeof *out), *alone = malloc(heads * dim * sizeof *out);
    double scale = 1.0 / sqrt((double)dim);
    lamina_paged_attention(query, heads * dim, keys, values, blocks, block, table, blocks, seq,
                           num_keys, out, L, heads, kv_heads, dim, (float)scale);
    double *scores = malloc(L * sizeof *scores);
    int close = 1, same_bits = 1;
    for (long t = 0; t < L; t++) {
        for (long h = 0; h < heads; h++) {
            long g = h / (heads / kv_heads);
            const float *q = query + (t * heads + h) * dim;
            double top = -INFINITY, total = 0.0;
            for (long j = 0; j <= t; j++) {
                const float *k = keys + ((g * blocks + table[j / block]) * block + j % block) * dim;
                double dot_product = 0.0;
                for (long d = 0; d < dim; d++) dot_product += (double)q[d] * k[d];
                scores[j] = dot_product * (float)scale;
                top = scores[j] > top ? scores[j] : top;
            }
            for (long j = 0; j <= t; j++) total += scores[j] = exp(scores[j] - top);
            for (long d = 0; d < dim; d++) {
                double expected = 0.0;
                for (long j = 0; j <= t; j++)
                    expected += scores[j] / total *
                                values[((g * blocks + table[j / block]) * block + j % block) * dim + d];
                double error = fabs(out[(t * heads + h) * dim + d] - expected);
                if (!(error <= 2e-6 + 1e-5 * fabs(expected))) close = 0;
            }
        }
        lamina_paged_attention(query + t * heads * dim, heads * dim, keys, values, blocks, block,
                               table, blocks, seq, num_keys + t, alone, 1, heads, kv_heads, dim,
                               (float)scale);
        if (memcmp(alone, out + t * heads * dim, heads * dim * sizeof *alone) != 0) same_bits = 0;
    }
    char what[160];
    snprintf(what, sizeof what, "attention %ld tokens, %ld/%ld heads, dim %ld: matches doubles",
             L, heads, kv_heads, dim);
    report(close, what);
    snprintf(what, sizeof what, "attention %ld tokens, %ld/%ld heads, dim %ld: each token alone",
             L, heads, kv_heads, dim);
    report(same_bits, what);
    free(query), free(keys), free(values), free(table), free(seq), free(num_keys);
    free(out), free(alone), free(scores);
}

int main(void) {
    for (int half = 0; half < 2; half++) {
        check_matmul(13, 70, 150, half); /* 3 panels, the last partial; 2 tiles of rows + 1 */
        check_matmul(50, 33, 64, half);  /* past the 48-row block */
    }
    check_matmul_bf16(13, 70, 150); /* as above; an even K */
    check_matmul_bf16(50, 33, 64);  /* an odd K: a half-empty last pair */
    for (int kind = WEIGHTS_I8; kind <= WEIGHTS_I4; kind++) {
        check_matmul_blocks(13, 96, 150, kind); /* 3 blocks of k, 3 panels, the last partial */
        check_matmul_blocks(50, 32, 64, kind);  /* one block, past the 48-row block */
    }
    check_attention(37, 4, 2, 64); /* whole vectors */
    check_attention(21, 3, 1, 24); /* a tail of 8 lanes */
    printf("%s\n", failures ? "some checks FAILED" : "all checks passed");
    return failures ? 1 : 0;
}
