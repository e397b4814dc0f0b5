/*
 * lamina's native CPU kernels (fp32 activations): a matmul against panel-packed weights,
 * paged attention that reads the KV blocks in place, and a whole stack of LLaMA decoder
 * layers built from them (one call and one parallel region per step).
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
 * -fopenmp -ffp-contract=fast. OpenMP resolves to the libgomp torch already loaded, so
 * these kernels share torch's worker threads instead of starting a second pool.
 * Measured design choices, and what did not help: docs/performance.md, "Native kernels".
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define LANES 16                 /* floats per vector */
#define PANEL (4 * LANES)        /* columns per packed weight panel */
#define ROW_BLOCK 48             /* rows per matmul work item, 8 tiles (linear_phase) */
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
 * (zero columns past N), stored in fp32 or in fp16 (converted to fp32 as loaded; the
 * sums are fp32 either way). Work is split into 16-column units; a tile is up to 6 rows
 * by up to 4 units of one panel.
 */

static inline vecf load_f32(const float *p) { return load(p); }
/* 16 halves -> 16 floats. GCC turns a generic vector conversion into 16 scalar ones
 * (measured: the fp16 kernel ran at half the fp32 one's speed), so x86 gets the
 * conversion instructions themselves. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vecf load_f16(const _Float16 *p) {
    return (vecf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
#elif defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
static inline vecf load_f16(const _Float16 *p) {
    __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 high = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    vecf out;
    memcpy(&out, &low, sizeof low);
    memcpy((char *)&out + sizeof low, &high, sizeof high);
    return out;
}
#else
typedef _Float16 vech __attribute__((vector_size(32), aligned(2))); /* 16 halves */
static inline vecf load_f16(const _Float16 *p) {
    return __builtin_convertvector(*(const vech *)p, vecf);
}
#endif

/* Store a tile's rows: columns [col, col + 16 * nv) of y, clipped to N, plus bias; with
 * `accumulate`, added to what y holds (a residual connection: y + (xW + b), the order
 * torch's `x.add_(linear(h))` has). */
static void store_tile(vecf acc[MAX_ROWS][4], int rows, int nv, float *y, long ldy, long col,
                       long N, const float *bias, int accumulate) {
    for (int r = 0; r < rows; r++) {
        for (int v = 0; v < nv; v++) {
            long c = col + v * LANES;
            vecf value = acc[r][v];
            float lanes[LANES];
            memcpy(lanes, &value, sizeof lanes);
            long count = N - c < LANES ? N - c : LANES;
            float *out = y + r * ldy + c;
            if (count == LANES) { /* a whole vector: the same sums, without the lane loop */
                vecf sum = bias ? value + load(bias + c) : value;
                store(out, accumulate ? load(out) + sum : sum);
                continue;
            }
            for (long i = 0; i < count; i++) {
                float sum = bias ? lanes[i] + bias[c + i] : lanes[i];
                out[i] = accumulate ? out[i] + sum : sum;
            }
        }
    }
}

/* Where the tile-th row tile of a panel prefetches while it runs, or NULL. The first
 * tile streams the panel from memory faster than memory delivers it; the tiles after it
 * read the panel from L2, so they fetch the next panel meanwhile, a cache line per k
 * each, and memory stays busy while they compute (the model's 121 matmuls at 32 rows:
 * 45.6 -> 42.8 ms; at 128 and 256 rows within 2 %; at 1 row there is no second tile). */
static inline const char *prefetch_target(const void *next_panel, long panel_bytes, long tile,
                                          long K) {
    long part = tile - 1;
    if (!next_panel || part < 0 || part * K * 64 >= panel_bytes) return 0;
    return (const char *)next_panel + part * K * 64;
}

/* One tile: rows x (nv vectors of 16 columns), accumulated over all of K in order. */
#define DEFINE_TILE(WT, WTYPE, ROWS, NV)                                                   \
    static void tile_##WT##_##ROWS##_##NV(const float *x, long ldx, const WTYPE *w, long K, \
                                          vecf out[MAX_ROWS][4], const char *ahead) {      \
        vecf acc[ROWS][NV];                                                                \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < NV; v++) acc[r][v] = broadcast(0.0f);                      \
        for (long k = 0; k < K; k++) {                                                     \
            const WTYPE *wk = w + k * PANEL;                                               \
            if (ahead) __builtin_prefetch(ahead + k * 64, 0, 2); /* a line per k */        \
            vecf wv[NV];                                                                   \
            for (int v = 0; v < NV; v++) wv[v] = load_##WT(wk + v * LANES);                \
            for (int r = 0; r < ROWS; r++) {                                               \
                vecf a = broadcast(x[r * ldx + k]);                                        \
                for (int v = 0; v < NV; v++) acc[r][v] = acc[r][v] + a * wv[v];            \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < NV; v++) out[r][v] = acc[r][v];                            \
    }
#define DEFINE_TILES(WT, WTYPE, ROWS)                                                      \
    DEFINE_TILE(WT, WTYPE, ROWS, 1) DEFINE_TILE(WT, WTYPE, ROWS, 2)                        \
    DEFINE_TILE(WT, WTYPE, ROWS, 3) DEFINE_TILE(WT, WTYPE, ROWS, 4)
#define TILE_ROW(WT, R) {tile_##WT##_##R##_1, tile_##WT##_##R##_2, tile_##WT##_##R##_3,     \
                         tile_##WT##_##R##_4}

/* Everything of one weight type: its tiles, a table of them, and the loop over a run of
 * 16-column units for all M rows. */
#define DEFINE_MATMUL_UNITS(WT, WTYPE)                                                     \
    DEFINE_TILES(WT, WTYPE, 1) DEFINE_TILES(WT, WTYPE, 2) DEFINE_TILES(WT, WTYPE, 3)       \
    DEFINE_TILES(WT, WTYPE, 4) DEFINE_TILES(WT, WTYPE, 5) DEFINE_TILES(WT, WTYPE, 6)       \
    typedef void (*tile_##WT##_fn)(const float *, long, const WTYPE *, long,               \
                                   vecf[MAX_ROWS][4], const char *);                       \
    static const tile_##WT##_fn TILES_##WT[MAX_ROWS][4] = {                                \
        TILE_ROW(WT, 1), TILE_ROW(WT, 2), TILE_ROW(WT, 3),                                 \
        TILE_ROW(WT, 4), TILE_ROW(WT, 5), TILE_ROW(WT, 6)};                                \
    /* Units [first, last) of 16 columns, for all M rows; with lookahead, the tiles after  \
     * the first prefetch the next panel. */                                              \
    static void matmul_units_##WT(const float *x, long ldx, const WTYPE *panels,           \
                                  const float *bias, float *y, long M, long K, long N,     \
                                  long first, long last, int accumulate, int lookahead) {  \
        vecf acc[MAX_ROWS][4];                                                             \
        long unit = first;                                                                 \
        while (unit < last) {                                                              \
            long panel = unit / 4, offset = unit % 4;                                      \
            int nv = (int)((last - unit) < (4 - offset) ? (last - unit) : (4 - offset));   \
            const WTYPE *w = panels + panel * K * PANEL + offset * LANES;                  \
            const void *next = lookahead && offset == 0 && (panel + 1) * PANEL < N         \
                                   ? panels + (panel + 1) * K * PANEL : 0;                 \
            for (long row = 0; row < M; row += MAX_ROWS) {                                 \
                int rows = (int)(M - row < MAX_ROWS ? M - row : MAX_ROWS);                 \
                const char *ahead = prefetch_target(next, K * PANEL * (long)sizeof(WTYPE), \
                                                    row / MAX_ROWS, K);                    \
                TILES_##WT[rows - 1][nv - 1](x + row * ldx, ldx, w, K, acc, ahead);        \
                store_tile(acc, rows, nv, y + row * N, N, unit * LANES, N, bias,           \
                           accumulate);                                                    \
            }                                                                              \
            unit += nv;                                                                    \
        }                                                                                  \
    }

DEFINE_MATMUL_UNITS(f32, float)
/* The same with fp16 panels: half the bytes a single stream reads per token. */
DEFINE_MATMUL_UNITS(f16, _Float16)

/* A linear layer's packed weight as the kernels see it. Rows of a matmul may take two
 * weight copies: rows [0, split) the first (prompt tokens), the rest the second
 * (generated tokens, fp16 panels with LAMINA_WEIGHT_DTYPE=float16). */
typedef struct {
    const void *panels[2];    /* [ceil(out/64)][in][64], fp32 or fp16 */
    int32_t half[2];          /* whether panels[i] holds fp16 */
    const float *bias;        /* [out] or NULL */
    long in_features, out_features;
} linear_desc;

/* y[M, out] (=, or += with `accumulate`) x[M, in] . W + bias, shared among the threads of
 * the enclosing parallel region (an orphaned `omp for`; alone outside one). A work item is
 * one panel for a block of up to ROW_BLOCK rows, panel-major: at decode sizes (M <=
 * ROW_BLOCK) that is one panel for every row; for prompts, the rows split too, so the
 * 9 panels of a 576-wide projection no longer leave one thread a panel behind the other
 * (the model's 121 matmuls at 256 / 512 rows: 344.7 / 698.6 -> 335.1 / 679.9 ms). Items
 * are handed out with schedule(guided): long contiguous runs first (as fast as a static
 * split), then single items, so a thread the OS delays (the HTTP event loop, a client on
 * the same cores) leaves its last items to the others instead of making them wait. Only
 * a panel's last row block prefetches the next panel. Ends with the loop's barrier: y is
 * complete for every thread. */
static void linear_phase(const linear_desc *w, const float *x, long ldx, long M, long split,
                         float *y, int accumulate) {
    long K = w->in_features, N = w->out_features;
    long units = (N + LANES - 1) / LANES, chunks = (units + 3) / 4; /* one panel each */
    long row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp for schedule(guided)
    for (long item = 0; item < chunks * row_blocks; item++) {
        long chunk = item / row_blocks, block = item % row_blocks;
        long first = chunk * 4, last = first + 4 < units ? first + 4 : units;
        long lo = block * ROW_BLOCK, hi = lo + ROW_BLOCK < M ? lo + ROW_BLOCK : M;
        int lookahead = block == row_blocks - 1;
        for (int kind = 0; kind < 2; kind++) { /* the block's prompt rows, then the others */
            long row = kind ? split : 0, end = kind ? M : split;
            row = row > lo ? row : lo;
            end = end < hi ? end : hi;
            if (end <= row) continue;
            const float *xr = x + row * ldx;
            float *yr = y + row * N;
            if (w->half[kind])
                matmul_units_f16(xr, ldx, w->panels[kind], w->bias, yr, end - row, K, N, first,
                                 last, accumulate, lookahead);
            else
                matmul_units_f32(xr, ldx, w->panels[kind], w->bias, yr, end - row, K, N, first,
                                 last, accumulate, lookahead);
        }
    }
}

/* y[M, N] = x[M, K] . W (+ bias), W packed as panels of fp32 (half = 0) or fp16. */
void lamina_matmul(const float *x, long ldx, const void *panels, int32_t half, const float *bias,
                   float *y, long M, long K, long N) {
    linear_desc w = {{panels, panels}, {half, half}, bias, K, N};
    int parallel = M * K * N >= (1L << 18);
#pragma omp parallel if (parallel)
    linear_phase(&w, x, ldx, M, M, y, 0);
}

/* Pack W [N, K] (a Linear's weight, row-major) into panels [ceil(N/64)][K][64]. */
#define DEFINE_PACK(NAME, WTYPE)                                                           \
    void NAME(const float *weight, WTYPE *panels, long N, long K) {                        \
        long num_panels = (N + PANEL - 1) / PANEL;                                         \
        _Pragma("omp parallel for")                                                        \
        for (long p = 0; p < num_panels; p++) {                                            \
            for (long k = 0; k < K; k++) {                                                 \
                WTYPE *dst = panels + (p * K + k) * PANEL;                                 \
                for (long c = 0; c < PANEL; c++) {                                         \
                    long n = p * PANEL + c;                                                \
                    dst[c] = (WTYPE)(n < N ? weight[n * K + k] : 0.0f);                    \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }
DEFINE_PACK(lamina_pack_weight, float)
DEFINE_PACK(lamina_pack_weight_f16, _Float16) /* rounds to nearest fp16 */

/* The arithmetic ceiling the benchmarks compare against: every thread runs chains of
 * vector FMAs on registers only (12 independent chains, more than the FMA latency needs),
 * no memory traffic. Returns the FLOPs done; the caller times the call. */
double lamina_fma_peak(long iterations) {
    double flops = 0.0;
#pragma omp parallel reduction(+ : flops)
    {
        const vecf scale = broadcast(0.9999999f), shift = broadcast(1e-7f);
        vecf chains[12];
        for (int c = 0; c < 12; c++) chains[c] = broadcast((float)c);
        for (long i = 0; i < iterations; i++)
            for (int c = 0; c < 12; c++) chains[c] = chains[c] * scale + shift;
        __asm__ volatile("" ::"m"(chains)); /* the results are used: keep the FMAs */
        flops += 2.0 * LANES * 12 * (double)iterations;
    }
    return flops;
}

/* ---------------------------------------------------------------------------------
 * Paged attention. Item = (tile, KV head): a tile is up to 4 consecutive tokens of one
 * sequence (a prefill chunk) or a single token (a decode); that KV head's query heads
 * (GQA) attend over each token's first num_keys cached keys, read in place from the
 * blocks its table lists. A prefill tile's query heads go one after another; a decode
 * token's go together, as the rows of one tile, so its keys and values are read once.
 * Sharing a tile only shares memory traffic: every query's arithmetic is the same as if
 * it were computed alone. While a thread computes an item it prefetches the next one.
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

/* The 16-lane partial sums of a . b over the whole vectors of D (in d order). */
static inline vecf partial_dot(const float *a, const float *b, long D) {
    vecf acc = broadcast(0.0f);
    for (long d = 0; d + LANES <= D; d += LANES) acc = acc + load(a + d) * load(b + d);
    return acc;
}

static float dot(const float *a, const float *b, long D) {
    float s = sum_lanes(partial_dot(a, b, D));
    for (long d = D / LANES * LANES; d < D; d++) s += a[d] * b[d];
    return s;
}

/* sum_lanes of 16 vectors at once: lane i of the result is sum_lanes(p[i]), bit for bit
 * (each step adds lane l and lane l + width of one key, as sum_lanes does), at 15 adds
 * instead of 64 shuffles and adds. */
static inline vecf sum_lanes_16(vecf p[16]) {
    static const veci lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    static const veci hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    static const veci lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    static const veci hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    static const veci lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    static const veci hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    static const veci lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    static const veci hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    vecf q[8], r[4], t[2];
    for (int k = 0; k < 8; k++) /* keys 2k, 2k+1: 8 lanes each */
        q[k] = __builtin_shuffle(p[2 * k], p[2 * k + 1], lo1) +
               __builtin_shuffle(p[2 * k], p[2 * k + 1], hi1);
    for (int k = 0; k < 4; k++) /* keys 4k..4k+3: 4 lanes each */
        r[k] = __builtin_shuffle(q[2 * k], q[2 * k + 1], lo2) +
               __builtin_shuffle(q[2 * k], q[2 * k + 1], hi2);
    for (int k = 0; k < 2; k++) /* keys 8k..8k+7: 2 lanes each */
        t[k] = __builtin_shuffle(r[2 * k], r[2 * k + 1], lo3) +
               __builtin_shuffle(r[2 * k], r[2 * k + 1], hi3);
    return __builtin_shuffle(t[0], t[1], lo4) + __builtin_shuffle(t[0], t[1], hi4);
}

/* e^x, 16 at a time, for x <= 88 (softmax after subtracting the maximum; SiLU clamps):
 * x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial, 2^n through the exponent
 * bits (n <= 127 keeps them finite). Relative error ~1e-7; underflows to 0 below -87. */
static inline vecf exp_upto_88(vecf x) {
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

/* probs[0:L] = softmax(scores[0:L]), in place. scores must have room for L rounded up
 * to 16 (the tail is computed as a whole vector). The sum runs in 16 lanes (lane l adds
 * keys l, l + 16, ... in order) and then sum_lanes: a fixed order for a given L. */
static void softmax(float *scores, long L) {
    long padded = (L + LANES - 1) / LANES * LANES;
    for (long j = L; j < padded; j++) scores[j] = -INFINITY; /* exp gives 0: adds nothing */
    vecf top = load(scores);
    for (long j = LANES; j < padded; j += LANES) {
        vecf x = load(scores + j);
        top = blend(x > top, x, top);
    }
    float max = top[0];
    for (int l = 1; l < LANES; l++) max = top[l] > max ? top[l] : max; /* exact in any order */
    vecf total = broadcast(0.0f);
    for (long j = 0; j < padded; j += LANES) {
        vecf e = exp_upto_88(load(scores + j) - max);
        store(scores + j, e);
        total = total + e;
    }
    vecf inverse = broadcast(1.0f / sum_lanes(total));
    for (long j = 0; j < padded; j += LANES) store(scores + j, load(scores + j) * inverse);
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

/* Rows computed together: each block of keys or values is read from memory once per
 * tile and from L1 by the tile's other rows. Row r of a tile sees L0 + r * step keys:
 * step 1 for consecutive tokens of one sequence, 0 for the query heads of one token.
 * Every row's arithmetic is exactly what it would be alone. */
#define TILE 4

/* The next item's blocks, prefetched while this item computes. One block after another,
 * a thread waits for memory at each block: scattered 4 KiB blocks come at ~21 GB/s to
 * two threads, where several streams at once get ~37 GB/s. So a thread claims its next
 * item before computing the current one, and at each block it computes prefetches a
 * share of the next item's lines, AHEAD_WAYS blocks in round-robin. The share is even:
 * prefetching all of it early was slower (the loads then wait behind the prefetches).
 * Decode attention, 32 sequences x 190 keys, every layer, scattered blocks: 16.8 ->
 * 12.2 ms (docs/performance.md). */
#define AHEAD_WAYS 8
#define AHEAD_MAX_BLOCKS 64 /* per K or V: 1024 keys at 16 a block; later ones on demand */

typedef struct {
    const char *blocks[2 * AHEAD_MAX_BLOCKS]; /* the next item's K blocks, then its V blocks */
    long num_blocks, lines_per_block;
    long lines_per_call;                      /* rows of up to AHEAD_WAYS lines per call */
    long group, line, ways;                   /* cursor: first block of group, line, width */
} prefetcher;

/* Prefetch the next lines_per_call rows of lines; a no-op once all are asked for. */
static inline void prefetch_some(prefetcher *p) {
    if (!p) return;
    for (long c = 0; c < p->lines_per_call && p->group < p->num_blocks; c++) {
        const char *const *blocks = p->blocks + p->group;
        long offset = p->line * 64;
        for (long j = 0; j < p->ways; j++) __builtin_prefetch(blocks[j] + offset, 0, 3);
        if (++p->line == p->lines_per_block) {
            p->line = 0;
            p->group += AHEAD_WAYS;
            long left = p->num_blocks - p->group;
            p->ways = left < AHEAD_WAYS ? left : AHEAD_WAYS;
        }
    }
}

/* scores[r][j] = q_r . k_j for j < L0 + r * step, block by block. queries: [count][D],
 * scaled. Prefetches a share of the next item at each block. */
static inline __attribute__((always_inline)) void score_tile(
    const float *queries, long count, long L0, long step, const float *k_head,
    const int32_t *table, long block_size, long D, float *scores, long stride,
    prefetcher *ahead) {
    long block_elems = block_size * D, keys = L0 + (count - 1) * step;
    for (long start = 0, b = 0; start < keys; start += block_size, b++) {
        const float *block = k_head + table[b] * block_elems;
        prefetch_some(ahead);
        for (long r = 0; r < count; r++) {
            long seen = L0 + r * step - start;
            long n = seen < block_size ? seen : block_size;
            const float *q = queries + r * D;
            float *s = scores + r * stride + start;
            long i = 0;
            if (D % LANES == 0) /* 16 keys at a time, same bits as one at a time */
                for (; i + LANES <= n; i += LANES) {
                    vecf partials[LANES];
                    for (int k = 0; k < LANES; k++)
                        partials[k] = partial_dot(q, block + (i + k) * D, D);
                    store(s + i, sum_lanes_16(partials));
                }
            for (; i < n; i++) s[i] = dot(q, block + i * D, D);
        }
    }
}

/* out_r[0:D] = sum_j probs[r][j] v_j over j < L0 + r * step, each element summed in key
 * order, in registers, 64 columns at a time. Row r is written at out + r * out_stride.
 * Prefetches a share of the next item at each block of each 64 columns. */
static inline __attribute__((always_inline)) void weigh_tile(
    const float *probs, long stride, long count, long L0, long step, const float *v_head,
    const int32_t *table, long block_size, long D, float *out, long out_stride,
    prefetcher *ahead) {
    long block_elems = block_size * D, keys = L0 + (count - 1) * step;
    if (D % LANES) { /* a head_dim not a multiple of 16: plain scalar sums */
        for (long r = 0; r < count; r++)
            for (long d = 0; d < D; d++) {
                float acc = 0.0f;
                for (long j = 0; j < L0 + r * step; j++)
                    acc += probs[r * stride + j] *
                           v_head[table[j / block_size] * block_elems + (j % block_size) * D + d];
                out[r * out_stride + d] = acc;
            }
        return;
    }
    for (long d0 = 0; d0 < D; d0 += 4 * LANES) {
        long nv = D - d0 < 4 * LANES ? (D - d0) / LANES : 4;
        vecf acc[TILE][4];
        for (long r = 0; r < TILE; r++)
            for (long c = 0; c < 4; c++) acc[r][c] = broadcast(0.0f);
        for (long start = 0, b = 0; start < keys; start += block_size, b++) {
            const float *block = v_head + table[b] * block_elems + d0;
            prefetch_some(ahead);
            long n = keys - start < block_size ? keys - start : block_size;
            for (long i = 0; i < n; i++) {
                long j = start + i;
                vecf v[4];
                for (long c = 0; c < nv; c++) v[c] = load(block + i * D + c * LANES);
                for (long r = 0; r < count; r++) {
                    if (j >= L0 + r * step) continue; /* beyond this row's keys */
                    vecf p = broadcast(probs[r * stride + j]);
                    for (long c = 0; c < nv; c++) acc[r][c] = acc[r][c] + p * v[c];
                }
            }
        }
        for (long r = 0; r < count; r++)
            for (long c = 0; c < nv; c++) store(out + r * out_stride + d0 + c * LANES, acc[r][c]);
    }
}

/* Whether a tile of `count` tokens computes its query heads as the rows of one tile. */
static inline int heads_as_rows(const attention_args *a, long count) {
    return count == 1 && a->num_heads / a->num_kv_heads <= TILE;
}

/* One (tile of tokens, KV head). A decode token: its group of query heads as one tile's
 * rows (one pass over the keys and values). Several tokens: the query heads one after
 * another (the head's keys and values stay in L1/L2 between them). scratch: TILE *
 * stride floats. */
static inline __attribute__((always_inline)) void attend_tile_d(
    const attention_args *a, long first, long count, long head, float *scratch, long stride,
    long D, prefetcher *ahead) {
    long group = a->num_heads / a->num_kv_heads, L0 = a->num_keys[first];
    long head_elems = a->num_blocks * a->block_size * D;
    const int32_t *table = a->tables + a->token_seq[first] * a->table_stride;
    const float *k_head = a->keys + head * head_elems, *v_head = a->values + head * head_elems;
    if (heads_as_rows(a, count)) {
        const float *query = a->query + first * a->q_stride + head * group * D;
        float queries[TILE * D];
        for (long i = 0; i < group * D; i++) queries[i] = query[i] * a->scale;
        score_tile(queries, group, L0, 0, k_head, table, a->block_size, D, scratch, stride,
                   ahead);
        for (long g = 0; g < group; g++) softmax(scratch + g * stride, L0);
        float *out = a->out + (first * a->num_heads + head * group) * D;
        weigh_tile(scratch, stride, group, L0, 0, v_head, table, a->block_size, D, out, D,
                   ahead);
        return;
    }
    for (long g = 0; g < group; g++) {
        long q_head = head * group + g;
        float queries[TILE * D];
        for (long r = 0; r < count; r++)
            for (long d = 0; d < D; d++)
                queries[r * D + d] = a->query[(first + r) * a->q_stride + q_head * D + d] * a->scale;
        score_tile(queries, count, L0, 1, k_head, table, a->block_size, D, scratch, stride,
                   ahead);
        for (long r = 0; r < count; r++) softmax(scratch + r * stride, L0 + r);
        float *out = a->out + (first * a->num_heads + q_head) * D;
        weigh_tile(scratch, stride, count, L0, 1, v_head, table, a->block_size, D, out,
                   a->num_heads * D, ahead);
    }
}

/* The common head sizes and every tile height get their own copies, so the compiler
 * unrolls the row loops and keeps the value sums in registers. */
#define ATTEND_FOR_D(COUNT)                                                                \
    switch (a->head_dim) {                                                                 \
    case 64: attend_tile_d(a, first, COUNT, head, scratch, stride, 64, ahead); break;             \
    case 128: attend_tile_d(a, first, COUNT, head, scratch, stride, 128, ahead); break;           \
    default: attend_tile_d(a, first, COUNT, head, scratch, stride, a->head_dim, ahead); break;    \
    }

static void attend_tile(const attention_args *a, long first, long count, long head,
                        float *scratch, long stride, prefetcher *ahead) {
    switch (count) {
    case 1: ATTEND_FOR_D(1) break;
    case 2: ATTEND_FOR_D(2) break;
    case 3: ATTEND_FOR_D(3) break;
    default: ATTEND_FOR_D(TILE) break;
    }
}

/* Tiles: runs of up to TILE tokens of one sequence at consecutive positions. */
static long make_tiles(const int32_t *token_seq, const int32_t *num_keys, long num_tokens,
                       long *starts) {
    long tiles = 0;
    for (long t = 0; t < num_tokens;) {
        long n = 1;
        while (n < TILE && t + n < num_tokens && token_seq[t + n] == token_seq[t] &&
               num_keys[t + n] == num_keys[t] + n)
            n++;
        starts[tiles++] = t;
        t += n;
    }
    starts[tiles] = num_tokens;
    return tiles;
}

/* The blocks of tile `tile` (its last token's keys) for KV head `head`. */
static long tile_blocks(const attention_args *a, const long *starts, long tile) {
    return (a->num_keys[starts[tile + 1] - 1] + a->block_size - 1) / a->block_size;
}

/* Aim `p` at item `next`, its prefetches spread over the blocks item `item` computes. */
static void plan_prefetch(prefetcher *p, const attention_args *a, const long *starts,
                          long item, long next) {
    long tile = next / a->num_kv_heads, head = next % a->num_kv_heads;
    long block_elems = a->block_size * a->head_dim;
    long head_elems = a->num_blocks * block_elems;
    const int32_t *table = a->tables + a->token_seq[starts[tile]] * a->table_stride;
    long n = tile_blocks(a, starts, tile);
    n = n < AHEAD_MAX_BLOCKS ? n : AHEAD_MAX_BLOCKS;
    for (long b = 0; b < n; b++) {
        p->blocks[b] = (const char *)(a->keys + head * head_elems + table[b] * block_elems);
        p->blocks[n + b] = (const char *)(a->values + head * head_elems + table[b] * block_elems);
    }
    p->num_blocks = 2 * n;
    p->lines_per_block = (block_elems * (long)sizeof(float) + 63) / 64; /* at least 1 */
    p->group = p->line = 0;
    p->ways = p->num_blocks < AHEAD_WAYS ? p->num_blocks : AHEAD_WAYS;
    /* The calls item `item` makes: per pass, one per key block and one per value block
     * per 64 columns. */
    long this_tile = item / a->num_kv_heads;
    long count = starts[this_tile + 1] - starts[this_tile];
    long passes = heads_as_rows(a, count) ? 1 : a->num_heads / a->num_kv_heads;
    long calls = passes * tile_blocks(a, starts, this_tile) * (1 + (a->head_dim + 63) / 64);
    long rows = (p->num_blocks + AHEAD_WAYS - 1) / AHEAD_WAYS * p->lines_per_block;
    p->lines_per_call = (rows + calls - 1) / calls;
}

/* Every (tile, KV head) item of a step, shared among the threads of the enclosing
 * parallel region through `*claimed` (zero on entry; each thread takes its next item
 * when it starts one, so it knows what to prefetch); ends with a barrier. scratch:
 * this thread's TILE * stride floats. Which thread computes an item changes no bits. */
static void attention_items(const attention_args *a, const long *starts, long tiles,
                            float *scratch, long stride, long *claimed) {
    long items = tiles * a->num_kv_heads;
    long item = __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED);
    while (item < items) {
        long next = __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED);
        prefetcher ahead;
        if (next < items) plan_prefetch(&ahead, a, starts, item, next);
        long tile = item / a->num_kv_heads, first = starts[tile];
        attend_tile(a, first, starts[tile + 1] - first, item % a->num_kv_heads, scratch, stride,
                    next < items ? &ahead : NULL);
        item = next;
    }
#pragma omp barrier
}

/* The score row length every query fits in: the most keys, rounded up to whole vectors. */
static long score_stride(const int32_t *num_keys, long num_tokens) {
    long max_keys = 1;
    for (long t = 0; t < num_tokens; t++) max_keys = num_keys[t] > max_keys ? num_keys[t] : max_keys;
    return (max_keys + LANES - 1) / LANES * LANES;
}

void lamina_paged_attention(const float *query, long q_stride, const float *keys,
                            const float *values, long num_blocks, long block_size,
                            const int32_t *tables, long table_stride, const int32_t *token_seq,
                            const int32_t *num_keys, float *out, long num_tokens,
                            long num_heads, long num_kv_heads, long head_dim, float scale) {
    attention_args a = {query,   q_stride,  keys,         values,   num_blocks,
                        block_size, tables, table_stride, token_seq, num_keys,
                        out,     num_heads, num_kv_heads, head_dim, scale};
    long stride = score_stride(num_keys, num_tokens);
    long *starts = malloc(sizeof(long) * (num_tokens + 1));
    long tiles = make_tiles(token_seq, num_keys, num_tokens, starts), claimed = 0;
#pragma omp parallel if (tiles * num_kv_heads > 1)
    {
        float *scratch = malloc(sizeof(float) * TILE * stride);
        attention_items(&a, starts, tiles, scratch, stride, &claimed);
        free(scratch);
    }
    free(starts);
}

/* ---------------------------------------------------------------------------------
 * A whole stack of LLaMA decoder layers in one call: one parallel region for every layer
 * of a step, so the threads meet at a barrier between phases instead of being woken for
 * each of ~150 separate kernels, and the row-wise work between the matmuls (norms, rotary
 * embedding, KV store, SwiGLU, residual adds) costs no torch dispatch. Every phase works
 * on each row (or each query, for attention) on its own, so batch invariance holds as in
 * the kernels above.
 */

typedef struct {
    const float *input_norm, *post_attention_norm; /* [hidden] */
    linear_desc qkv, o, gate_up, down;            /* qkv: q, k, v heads; gate_up: gate, up */
    float *keys, *values;                          /* [kv_heads, num_blocks, block_size, dim] */
} layer_desc;

typedef struct {
    long num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    long num_blocks, block_size; /* of the KV cache, scratch block included */
    float eps, scale;
    const layer_desc *layers;
} stack_desc;

typedef struct {
    float *x;                 /* [N, hidden]: the residual stream, updated in place */
    long num_tokens;
    long split;               /* rows [0, split) are prompt tokens (first weight copy) */
    const float *cos, *sin;   /* [N, head_dim]: each token's rotary row; sin carries the sign */
    const int64_t *slots;     /* [N]: cache slot (block * block_size + offset) per token */
    const int32_t *tables;    /* attention: as lamina_paged_attention takes them */
    long table_stride;
    const int32_t *token_seq, *num_keys;
    float *work;              /* N * (hidden + q + 2 kv + q + 3 intermediate) floats */
} step_desc;

/* out = x / rms(x) * weight per row: sum of squares in 16 lanes (in order), then sum_lanes. */
static void rms_norm_rows(const float *x, const float *weight, float *out, long N, long H,
                          float eps) {
#pragma omp for schedule(static)
    for (long t = 0; t < N; t++) {
        const float *row = x + t * H;
        vecf squares = broadcast(0.0f);
        long d = 0;
        for (; d + LANES <= H; d += LANES) squares = squares + load(row + d) * load(row + d);
        float sum = sum_lanes(squares);
        for (; d < H; d++) sum += row[d] * row[d];
        float inverse = 1.0f / sqrtf(sum / (float)H + eps);
        for (d = 0; d < H; d++) out[t * H + d] = row[d] * inverse * weight[d];
    }
}

/* Rotate the q and k heads of each qkv row (x * cos + rotate_half(x) * sin), then store
 * the row's keys and values at its cache slot. */
static void rotate_and_store_rows(const stack_desc *m, const layer_desc *layer,
                                  const step_desc *s, float *qkv, long width) {
    long D = m->head_dim, half = D / 2, rotated = m->num_heads + m->num_kv_heads;
    long head_elems = m->num_blocks * m->block_size * D;
#pragma omp for schedule(static)
    for (long t = 0; t < s->num_tokens; t++) {
        float *row = qkv + t * width;
        const float *cos = s->cos + t * D, *sin = s->sin + t * D;
        for (long h = 0; h < rotated; h++) {
            float *x = row + h * D, before[D];
            memcpy(before, x, sizeof before);
            for (long i = 0; i < D; i++)
                x[i] = before[i] * cos[i] + before[i < half ? i + half : i - half] * sin[i];
        }
        const float *k = row + m->num_heads * D, *v = k + m->num_kv_heads * D;
        for (long h = 0; h < m->num_kv_heads; h++) {
            memcpy(layer->keys + h * head_elems + s->slots[t] * D, k + h * D, sizeof(float) * D);
            memcpy(layer->values + h * head_elems + s->slots[t] * D, v + h * D, sizeof(float) * D);
        }
    }
}

/* act = silu(gate) * up per row; gate_up rows hold gate then up. */
static void swiglu_rows(const float *gate_up, float *act, long N, long I) {
#pragma omp for schedule(static)
    for (long t = 0; t < N; t++) {
        const float *gate = gate_up + t * 2 * I, *up = gate + I;
        float *out = act + t * I;
        long i = 0;
        for (; i + LANES <= I; i += LANES) {
            vecf g = load(gate + i), minus = -g;
            minus = blend(minus > broadcast(88.0f), broadcast(88.0f), minus); /* e^88 ~ inf */
            store(out + i, g / (broadcast(1.0f) + exp_upto_88(minus)) * load(up + i));
        }
        for (; i < I; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

void lamina_decoder_stack(const stack_desc *m, const step_desc *s) {
    long N = s->num_tokens, H = m->hidden, D = m->head_dim, I = m->intermediate;
    if (N == 0) return;
    long q_size = m->num_heads * D, width = q_size + 2 * m->num_kv_heads * D;
    float *normed = s->work;                 /* [N, H] */
    float *qkv = normed + N * H;             /* [N, width] */
    float *attended = qkv + N * width;       /* [N, q_size] */
    float *gate_up = attended + N * q_size;  /* [N, 2 I] */
    float *act = gate_up + N * 2 * I;        /* [N, I] */
    long stride = score_stride(s->num_keys, N);
    long *starts = malloc(sizeof(long) * (N + 1));
    long tiles = make_tiles(s->token_seq, s->num_keys, N, starts);
    long *claimed = calloc(m->num_layers, sizeof(long)); /* attention's item counter, a layer */
#pragma omp parallel
    {
        float *scratch = malloc(sizeof(float) * TILE * stride);
        for (long l = 0; l < m->num_layers; l++) {
            const layer_desc *layer = m->layers + l;
            attention_args a = {qkv, width, layer->keys, layer->values, m->num_blocks,
                                m->block_size, s->tables, s->table_stride, s->token_seq,
                                s->num_keys, attended, m->num_heads, m->num_kv_heads, D,
                                m->scale};
            rms_norm_rows(s->x, layer->input_norm, normed, N, H, m->eps);
            linear_phase(&layer->qkv, normed, H, N, s->split, qkv, 0);
            rotate_and_store_rows(m, layer, s, qkv, width);
            attention_items(&a, starts, tiles, scratch, stride, claimed + l);
            linear_phase(&layer->o, attended, q_size, N, s->split, s->x, 1);
            rms_norm_rows(s->x, layer->post_attention_norm, normed, N, H, m->eps);
            linear_phase(&layer->gate_up, normed, H, N, s->split, gate_up, 0);
            swiglu_rows(gate_up, act, N, I);
            linear_phase(&layer->down, act, I, N, s->split, s->x, 1);
        }
        free(scratch);
    }
    free(starts);
    free(claimed);
}
