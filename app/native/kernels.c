/*
 * lamina's native CPU kernels (fp32): a matmul against panel-packed weights and paged
 * attention that reads the KV blocks in place.
 *
 * Both are batch invariant by construction: every output element is computed by the
 * same sequence of floating-point operations whatever the number of rows, the other
 * rows, the thread count or how work is split. In the matmul each element accumulates
 * its K products one after another, starting from zero (no split of K, no tree), and
 * only the *columns* are tiled and shared between threads; in attention each query is
 * computed on its own over exactly its visible keys, in key order. So a token gets the
 * same bits alone or among 31 other requests, in a prefill chunk or a decode step,
 * with no padding.
 *
 * Compiled on the machine that runs it (app/native/build.py): -O3 -march=native
 * -fopenmp. OpenMP resolves to the libgomp torch already loaded, so these kernels share
 * torch's worker threads instead of starting a second pool.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define LANES 16                 /* floats per vector */
#define PANEL (4 * LANES)        /* columns per packed weight panel */
#define MAX_ROWS 6               /* rows per register tile: 6 x 4 accumulators */

typedef float vecf __attribute__((vector_size(64), aligned(4)));  /* unaligned-safe */
typedef int32_t veci __attribute__((vector_size(64), aligned(4)));

static inline vecf broadcast(float a) { return (vecf){} + a; }
static inline vecf load(const float *p) { return *(const vecf *)p; }
static inline void store(float *p, vecf v) { *(vecf *)p = v; }
/* mask ? a : b, lane by lane (mask lanes are all ones or zero, as comparisons give). */
static inline vecf blend(veci mask, vecf a, vecf b) {
    return (vecf)(((veci)a & mask) | ((veci)b & ~mask));
}

/* ---------------------------------------------------------------------------------
 * Matmul: y[M, N] = x[M, K] . W[K, N] (+ bias), W packed as panels [ceil(N/64)][K][64]
 * (zero columns past N). Work is split into 16-column units; a tile is up to 6 rows by
 * up to 4 units of one panel.
 */

/* One tile: rows x (nv vectors of 16 columns), accumulated over all of K in order. */
#define DEFINE_TILE(ROWS, NV)                                                              \
    static void tile_##ROWS##_##NV(const float *x, long ldx, const float *w, long K,      \
                                   vecf out[MAX_ROWS][4]) {                                \
        vecf acc[ROWS][NV];                                                                \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < NV; v++) acc[r][v] = broadcast(0.0f);                      \
        for (long k = 0; k < K; k++) {                                                     \
            const float *wk = w + k * PANEL;                                               \
            vecf wv[NV];                                                                   \
            for (int v = 0; v < NV; v++) wv[v] = load(wk + v * LANES);                     \
            for (int r = 0; r < ROWS; r++) {                                               \
                vecf a = broadcast(x[r * ldx + k]);                                        \
                for (int v = 0; v < NV; v++) acc[r][v] = acc[r][v] + a * wv[v];            \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < NV; v++) out[r][v] = acc[r][v];                            \
    }
#define DEFINE_TILES(ROWS) \
    DEFINE_TILE(ROWS, 1) DEFINE_TILE(ROWS, 2) DEFINE_TILE(ROWS, 3) DEFINE_TILE(ROWS, 4)
DEFINE_TILES(1) DEFINE_TILES(2) DEFINE_TILES(3) DEFINE_TILES(4) DEFINE_TILES(5)
DEFINE_TILES(6)

typedef void (*tile_fn)(const float *, long, const float *, long, vecf[MAX_ROWS][4]);
#define TILE_ROW(R) {tile_##R##_1, tile_##R##_2, tile_##R##_3, tile_##R##_4}
static const tile_fn TILES[MAX_ROWS][4] = {TILE_ROW(1), TILE_ROW(2), TILE_ROW(3),
                                           TILE_ROW(4), TILE_ROW(5), TILE_ROW(6)};

/* Store a tile's rows: columns [col, col + 16 * nv) of y, clipped to N, plus bias. */
static void store_tile(vecf acc[MAX_ROWS][4], int rows, int nv, float *y, long ldy, long col,
                       long N, const float *bias) {
    for (int r = 0; r < rows; r++) {
        for (int v = 0; v < nv; v++) {
            long c = col + v * LANES;
            vecf value = acc[r][v];
            float lanes[LANES];
            memcpy(lanes, &value, sizeof lanes);
            long count = N - c < LANES ? N - c : LANES;
            for (long i = 0; i < count; i++)
                y[r * ldy + c + i] = bias ? lanes[i] + bias[c + i] : lanes[i];
        }
    }
}

/* Units [first, last) of 16 columns, for all M rows. */
static void matmul_units(const float *x, long ldx, const float *panels, const float *bias,
                         float *y, long M, long K, long N, long first, long last) {
    vecf acc[MAX_ROWS][4];
    long unit = first;
    while (unit < last) {
        long panel = unit / 4, offset = unit % 4;
        int nv = (int)((last - unit) < (4 - offset) ? (last - unit) : (4 - offset));
        const float *w = panels + panel * K * PANEL + offset * LANES;
        long col = unit * LANES;
        for (long row = 0; row < M; row += MAX_ROWS) {
            int rows = (int)(M - row < MAX_ROWS ? M - row : MAX_ROWS);
            TILES[rows - 1][nv - 1](x + row * ldx, ldx, w, K, acc);
            store_tile(acc, rows, nv, y + row * N, N, col, N, bias);
        }
        unit += nv;
    }
}

void lamina_matmul(const float *x, long ldx, const float *panels, const float *bias,
                   float *y, long M, long K, long N) {
    long units = (N + LANES - 1) / LANES;
    long chunks = (units + 3) / 4; /* one panel each */
    int parallel = M * K * N >= (1L << 18);
    /* Guided: large contiguous runs of panels first (as fast as a static split), then
     * single panels, so a thread the OS delays (the HTTP event loop, a client on the
     * same cores) leaves its last panels to the others instead of making them wait. */
#pragma omp parallel for schedule(guided) if (parallel)
    for (long chunk = 0; chunk < chunks; chunk++) {
        long first = chunk * 4, last = first + 4 < units ? first + 4 : units;
        matmul_units(x, ldx, panels, bias, y, M, K, N, first, last);
    }
}

/* Pack W [N, K] (a Linear's weight, row-major) into panels [ceil(N/64)][K][64]. */
void lamina_pack_weight(const float *weight, float *panels, long N, long K) {
    long num_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for
    for (long p = 0; p < num_panels; p++) {
        for (long k = 0; k < K; k++) {
            float *dst = panels + (p * K + k) * PANEL;
            for (long c = 0; c < PANEL; c++) {
                long n = p * PANEL + c;
                dst[c] = n < N ? weight[n * K + k] : 0.0f;
            }
        }
    }
}

/* ---------------------------------------------------------------------------------
 * Paged attention. Item = (token, KV head): that head's query heads (GQA) attend over
 * the token's first num_keys cached keys, read from the blocks its table lists.
 */

/* Horizontal sum in a fixed order: lane i += lane i + 8, then + 4, + 2, + 1. */
static inline float sum_lanes(vecf v) {
    const veci half = {8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15};
    const veci quarter = {4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7};
    const veci eighth = {2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3};
    const veci sixteenth = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    v = v + __builtin_shuffle(v, half);
    v = v + __builtin_shuffle(v, quarter);
    v = v + __builtin_shuffle(v, eighth);
    v = v + __builtin_shuffle(v, sixteenth);
    return v[0];
}

static float dot(const float *a, const float *b, long D) {
    vecf acc = broadcast(0.0f);
    long d = 0;
    for (; d + LANES <= D; d += LANES) acc = acc + load(a + d) * load(b + d);
    float s = sum_lanes(acc);
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

/* e^x for x <= 0 (softmax after subtracting the maximum), 16 at a time: x = n ln2 + r,
 * |r| <= ln2 / 2, e^r by a degree-7 polynomial, 2^n through the exponent bits. Relative
 * error ~1e-7; underflows to 0 below -87. */
static inline vecf exp_nonpositive(vecf x) {
    const vecf lowest = broadcast(-87.0f);
    veci underflows = x < lowest;
    x = blend(underflows, lowest, x);
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    vecf n = (x * broadcast(1.44269504f) + shifter) - shifter;
    vecf r = x - n * broadcast(0.693145752f);
    r = r - n * broadcast(1.42860677e-06f);
    vecf p = broadcast(1.0f / 5040.0f);
    p = p * r + broadcast(1.0f / 720.0f);
    p = p * r + broadcast(1.0f / 120.0f);
    p = p * r + broadcast(1.0f / 24.0f);
    p = p * r + broadcast(1.0f / 6.0f);
    p = p * r + broadcast(0.5f);
    p = p * r + broadcast(1.0f);
    p = p * r + broadcast(1.0f);
    veci bits = (__builtin_convertvector(n, veci) + 127) << 23;
    vecf scale;
    memcpy(&scale, &bits, sizeof scale);
    vecf result = p * scale;
    return blend(underflows, broadcast(0.0f), result);
}

/* probs[0:L] = softmax(scores[0:L]), in place. */
static void softmax(float *scores, long L) {
    float max = scores[0];
    for (long j = 1; j < L; j++) max = scores[j] > max ? scores[j] : max;
    long j = 0;
    for (; j + LANES <= L; j += LANES)
        store(scores + j, exp_nonpositive(load(scores + j) - max));
    if (j < L) {
        float tail[LANES] = {0};
        memcpy(tail, scores + j, (L - j) * sizeof(float));
        vecf e = exp_nonpositive(load(tail) - max);
        memcpy(tail, &e, sizeof tail);
        memcpy(scores + j, tail, (L - j) * sizeof(float));
    }
    float total = 0.0f;
    for (j = 0; j < L; j++) total += scores[j];
    float inverse = 1.0f / total;
    for (j = 0; j < L; j++) scores[j] *= inverse;
}

typedef struct {
    const float *query;       /* [N, q_stride]: heads of head_dim at the row's start */
    long q_stride;
    const float *keys;        /* [kv_heads, num_blocks, block_size, head_dim] */
    const float *values;
    long num_blocks, block_size;
    const int32_t *tables;    /* [S, table_stride] block ids */
    long table_stride;
    const int32_t *token_seq; /* [N] which table */
    const int32_t *num_keys;  /* [N] keys visible to the token (its position + 1) */
    float *out;               /* [N, num_heads * head_dim] */
    long num_heads, num_kv_heads, head_dim;
    float scale;
} attention_args;

/* Scores of one query head over keys [0, L): s_j = q . k_j, in block order. */
static inline __attribute__((always_inline)) void score_keys(
    const float *query, const float *k_head, const int32_t *table, long L, long block_size,
    long D, float *scores) {
    long block_elems = block_size * D;
    for (long start = 0, b = 0; start < L; start += block_size, b++) {
        const float *block = k_head + table[b] * block_elems;
        long count = L - start < block_size ? L - start : block_size;
        for (long i = 0; i < count; i++) scores[start + i] = dot(query, block + i * D, D);
    }
}

/* out[0:D] = sum_j probs_j v_j, each element summed in key order, in registers. */
static inline __attribute__((always_inline)) void weigh_values(
    const float *probs, const float *v_head, const int32_t *table, long L, long block_size,
    long D, float *out) {
    long block_elems = block_size * D;
    for (long d0 = 0; d0 < D; d0 += 4 * LANES) { /* 64 columns at a time */
        long width = D - d0 < 4 * LANES ? D - d0 : 4 * LANES;
        if (width % LANES) { /* a head_dim not a multiple of 16: plain scalar sums */
            for (long d = d0; d < D; d++) {
                float acc = 0.0f;
                for (long start = 0, b = 0; start < L; start += block_size, b++) {
                    const float *block = v_head + table[b] * block_elems;
                    long count = L - start < block_size ? L - start : block_size;
                    for (long i = 0; i < count; i++) acc += probs[start + i] * block[i * D + d];
                }
                out[d] = acc;
            }
            return;
        }
        long nv = width / LANES;
        vecf acc[4] = {broadcast(0.0f), broadcast(0.0f), broadcast(0.0f), broadcast(0.0f)};
        for (long start = 0, b = 0; start < L; start += block_size, b++) {
            const float *block = v_head + table[b] * block_elems + d0;
            long count = L - start < block_size ? L - start : block_size;
            for (long i = 0; i < count; i++) {
                vecf p = broadcast(probs[start + i]);
                for (long v = 0; v < nv; v++) acc[v] = acc[v] + p * load(block + i * D + v * LANES);
            }
        }
        for (long v = 0; v < nv; v++) store(out + d0 + v * LANES, acc[v]);
    }
}

/* One (token, KV head): its group of query heads, one after another (the head's keys
 * and values stay in L1/L2 between them). scratch: L floats. */
static inline __attribute__((always_inline)) void attend_item_d(
    const attention_args *a, long token, long head, float *scratch, long D) {
    long group = a->num_heads / a->num_kv_heads, L = a->num_keys[token];
    long head_elems = a->num_blocks * a->block_size * D;
    const int32_t *table = a->tables + a->token_seq[token] * a->table_stride;
    for (long g = 0; g < group; g++) {
        long q_head = head * group + g;
        float query[D];
        const float *q_row = a->query + token * a->q_stride + q_head * D;
        for (long d = 0; d < D; d++) query[d] = q_row[d] * a->scale;
        score_keys(query, a->keys + head * head_elems, table, L, a->block_size, D, scratch);
        softmax(scratch, L);
        float *out = a->out + (token * a->num_heads + q_head) * D;
        weigh_values(scratch, a->values + head * head_elems, table, L, a->block_size, D, out);
    }
}

/* The common head sizes get their own copies, so the compiler unrolls for them. */
static void attend_item(const attention_args *a, long token, long head, float *scratch) {
    switch (a->head_dim) {
    case 64: attend_item_d(a, token, head, scratch, 64); break;
    case 128: attend_item_d(a, token, head, scratch, 128); break;
    default: attend_item_d(a, token, head, scratch, a->head_dim); break;
    }
}

void lamina_paged_attention(const float *query, long q_stride, const float *keys,
                            const float *values, long num_blocks, long block_size,
                            const int32_t *tables, long table_stride, const int32_t *token_seq,
                            const int32_t *num_keys, float *out, long num_tokens,
                            long num_heads, long num_kv_heads, long head_dim, float scale) {
    attention_args a = {query,   q_stride,  keys,         values,   num_blocks,
                        block_size, tables, table_stride, token_seq, num_keys,
                        out,     num_heads, num_kv_heads, head_dim, scale};
    long max_keys = 1;
    for (long t = 0; t < num_tokens; t++) max_keys = num_keys[t] > max_keys ? num_keys[t] : max_keys;
    long items = num_tokens * num_kv_heads;
#pragma omp parallel if (items > 1)
    {
        float *scratch = malloc(sizeof(float) * max_keys);
#pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < items; item++)
            attend_item(&a, item / num_kv_heads, item % num_kv_heads, scratch);
        free(scratch);
    }
}
