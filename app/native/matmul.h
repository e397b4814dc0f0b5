/* Part of kernels.c's one translation unit (after vector.h). */
#pragma once
#include "amx.h"
#include "bf16.h"
#include "int4.h"
#include "int8.h"
#include "vector.h"

/* ---------------------------------------------------------------------------------
 * Matmul: y[M, N] = x[M, K] . W[K, N] (+ bias), W packed as panels [ceil(N/64)][K][64]
 * (zero columns past N), stored in fp32 or in fp16 (converted to fp32 as loaded), or in
 * bf16 as K-pairs [ceil(N/64)][ceil(K/2)][64][2] with the rows of x rounded to bf16
 * (bf16.h), or in int8 blocks of 32 k with a scale per column and block (int8.h), or in
 * 4-bit blocks with a scale and a minimum (int4.h), the rows of x then quantized to int8
 * per block of 32 and each block's dot product an exact int32 sum. The sums over K are
 * fp32 in every case.
 * Work is split into 16-column units; a tile is up to 6 rows by up to 4 units of one
 * panel.
 */

/* how panels are stored */
enum { WEIGHTS_F32 = 0, WEIGHTS_F16 = 1, WEIGHTS_BF16 = 2, WEIGHTS_I8 = 3, WEIGHTS_I4 = 4 };

static inline vecf load_f32(const float *p) { return load(p); }

/* fp16 panels hold IEEE half-precision bits in uint16_t: clang before 15 has no _Float16
 * on x86, and the kernels only load and round halves, never compute in them. */
typedef uint16_t half_bits;

/* 16 halves -> 16 floats. GCC turns a generic vector conversion into 16 scalar ones
 * (measured: the fp16 kernel ran at half the fp32 one's speed), so x86 gets the
 * conversion instructions themselves. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vecf load_f16(const half_bits *p) {
    return (vecf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
#elif defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
static inline vecf load_f16(const half_bits *p) {
    __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    __m256 high = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)));
    vecf out;
    memcpy(&out, &low, sizeof low);
    memcpy((char *)&out + sizeof low, &high, sizeof high);
    return out;
}
#elif defined(__FLT16_MAX__) /* the compiler has _Float16 (ARM; GCC on older x86) */
typedef _Float16 vech __attribute__((vector_size(32), aligned(2))); /* 16 halves */
static inline vecf load_f16(const half_bits *p) {
    vech halves;
    memcpy(&halves, p, sizeof halves);
    return __builtin_convertvector(halves, vecf);
}
#else
#error "fp16 panels need F16C instructions or a compiler with _Float16"
#endif

/* One float rounded to the nearest half (ties to even), as its bits. */
static inline half_bits float_to_half(float value) {
#if defined(__FLT16_MAX__)
    _Float16 half = (_Float16)value;
    half_bits bits;
    memcpy(&bits, &half, sizeof bits);
    return bits;
#else /* F16C, as load_f16 requires */
    return (half_bits)_cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
#endif
}

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
                                          long steps) {
    long part = tile - 1; /* a line per step of the tile's loop (a k, or a K-pair) */
    if (!next_panel || part < 0 || part * steps * 64 >= panel_bytes) return 0;
    return (const char *)next_panel + part * steps * 64;
}

/* One tile: rows x (nv vectors of 16 columns), accumulated over all of K in order.
 * With AVX-512 a row's x[k] reaches every lane by a broadcast load, not by broadcast()'s
 * 0 + x[k] (a scalar add, then a shuffle on a port the FMAs need: the model's fp32
 * matmuls at 32-128 rows ran 1.25-1.4x faster without it on the Xeon with AMX). The same
 * bits: the accumulators start at +0 and an FMA never turns them into -0, so the sign of
 * a zero x[k] changes nothing, and 0 + x[k] is x[k] for every other value. */
#if defined(__AVX512F__)
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
                vecf a = (vecf)_mm512_set1_ps(x[r * ldx + k]);                             \
                for (int v = 0; v < NV; v++) acc[r][v] = acc[r][v] + a * wv[v];            \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < NV; v++) out[r][v] = acc[r][v];                            \
    }
#else
/* Without AVX-512 a 6 x 64 tile's 24 accumulators would be 48 ymm registers of AVX2's 16:
 * clang spills them and gcc keeps every 64-byte vector in memory (measured: the model's
 * matmuls at 32 rows 3.6x (clang) and 13x (gcc) slower than with the passes below, on
 * the same Zen 4 core). So a tile walks K once per group of units, in 8-lane halves, as
 * many units per walk as the registers hold: 4 for one row (8 accumulators, the weights
 * read as FMA operands), 2 for two rows (8 + 4 weight registers), else 1 (up to 6 rows x
 * 2 accumulators + 2 weights). One row still reads whole panel rows in order (a stream
 * the prefetchers follow). Every element sums its K products in order from zero, the
 * operations of the AVX-512 tile: the same bits, whatever the row count. The first walk
 * prefetches. */
static inline vec8 load8_f32(const float *p) { return *(const vec8 *)p; }
#if defined(__F16C__)
static inline vec8 load8_f16(const half_bits *p) {
    return (vec8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#else /* _Float16, as load_f16 requires */
typedef _Float16 vech8 __attribute__((vector_size(16), aligned(2)));
static inline vec8 load8_f16(const half_bits *p) {
    vech8 halves;
    memcpy(&halves, p, sizeof halves);
    return __builtin_convertvector(halves, vec8);
}
#endif
/* Units v .. v + U - 1 of a ROWS-row tile in one walk over K; then v += U. */
#define TILE8_WALK(WT, WTYPE, ROWS, U)                                                     \
    do {                                                                                   \
        vec8 acc[ROWS][2 * U];                                                             \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int j = 0; j < 2 * U; j++) acc[r][j] = (vec8){};                          \
        const WTYPE *units = w + v * LANES;                                                \
        const char *prefetch = v == 0 ? ahead : 0;                                         \
        for (long k = 0; k < K; k++) {                                                     \
            if (prefetch) __builtin_prefetch(prefetch + k * 64, 0, 2); /* a line per k */  \
            vec8 wk[2 * U];                                                                \
            for (int j = 0; j < 2 * U; j++)                                                \
                wk[j] = load8_##WT(units + k * PANEL + j * (LANES / 2));                   \
            for (int r = 0; r < ROWS; r++) {                                               \
                vec8 a = (vec8){} + x[r * ldx + k]; /* as broadcast() makes it */          \
                for (int j = 0; j < 2 * U; j++) acc[r][j] = acc[r][j] + a * wk[j];         \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++) memcpy(&out[r][v], acc[r], sizeof acc[r]);          \
        v += U;                                                                            \
    } while (0)
#define DEFINE_TILE(WT, WTYPE, ROWS, NV)                                                   \
    static void tile_##WT##_##ROWS##_##NV(const float *x, long ldx, const WTYPE *w, long K, \
                                          vecf out[MAX_ROWS][4], const char *ahead) {      \
        const int group = ROWS == 1 ? 4 : ROWS == 2 ? 2 : 1; /* units per walk */          \
        int v = 0;                                                                         \
        if (NV - v >= 3 && group >= 3) {                                                   \
            if (NV - v >= 4) TILE8_WALK(WT, WTYPE, ROWS, 4);                               \
            else TILE8_WALK(WT, WTYPE, ROWS, 3);                                           \
        }                                                                                  \
        while (NV - v >= 2 && group >= 2) TILE8_WALK(WT, WTYPE, ROWS, 2);                  \
        while (NV - v >= 1) TILE8_WALK(WT, WTYPE, ROWS, 1);                                \
    }
#endif
#define DEFINE_TILES(WT, WTYPE, ROWS)                                                      \
    DEFINE_TILE(WT, WTYPE, ROWS, 1) DEFINE_TILE(WT, WTYPE, ROWS, 2)                        \
    DEFINE_TILE(WT, WTYPE, ROWS, 3) DEFINE_TILE(WT, WTYPE, ROWS, 4)
#define TILE_ROW(WT, R) {tile_##WT##_##R##_1, tile_##WT##_##R##_2, tile_##WT##_##R##_3,     \
                         tile_##WT##_##R##_4}
/* For tiles of whole panels only (bf16.h): every width takes the 4-vector tile. */
#define WHOLE_PANEL_TILE_ROW(WT, R)                                                        \
    {tile_##WT##_##R##_4, tile_##WT##_##R##_4, tile_##WT##_##R##_4, tile_##WT##_##R##_4}

DEFINE_TILES(f32, float, 1) DEFINE_TILES(f32, float, 2) DEFINE_TILES(f32, float, 3)
DEFINE_TILES(f32, float, 4) DEFINE_TILES(f32, float, 5) DEFINE_TILES(f32, float, 6)
DEFINE_TILES(f16, half_bits, 1) DEFINE_TILES(f16, half_bits, 2) DEFINE_TILES(f16, half_bits, 3)
DEFINE_TILES(f16, half_bits, 4) DEFINE_TILES(f16, half_bits, 5) DEFINE_TILES(f16, half_bits, 6)

/* Everything of one weight type after its tiles: a table of them (ROW gives a row of it:
 * TILE_ROW, or WHOLE_PANEL_TILE_ROW), and the loop over a run of 16-column units for all
 * M rows. A tile's loop takes STEP values of k per step (1, 2 for bf16's K-pairs, 32 for
 * int8's blocks), a step of a panel is STEP_SIZE WTYPEs and STEP_LINES cache lines, x
 * is XTYPE (fp32, bf16.h's rounded rows, or int8.h's quantized blocks, ldx then counted
 * in blocks). */
#define DEFINE_MATMUL_UNITS(WT, XTYPE, WTYPE, STEP, ROW, STEP_SIZE, STEP_LINES)             \
    typedef void (*tile_##WT##_fn)(const XTYPE *, long, const WTYPE *, long,               \
                                   vecf[MAX_ROWS][4], const char *);                       \
    static const tile_##WT##_fn TILES_##WT[MAX_ROWS][4] = {                                \
        ROW(WT, 1), ROW(WT, 2), ROW(WT, 3), ROW(WT, 4), ROW(WT, 5), ROW(WT, 6)};           \
    /* Units [first, last) of 16 columns, for all M rows; with lookahead, the tiles after  \
     * the first prefetch the next panel. */                                              \
    static void matmul_units_##WT(const XTYPE *x, long ldx, const WTYPE *panels,           \
                                  const float *bias, float *y, long M, long K, long N,     \
                                  long first, long last, int accumulate, int lookahead) {  \
        vecf acc[MAX_ROWS][4];                                                             \
        long steps = (K + STEP - 1) / STEP, panel_size = steps * (STEP_SIZE);              \
        long unit = first;                                                                 \
        while (unit < last) {                                                              \
            long panel = unit / 4, offset = unit % 4;                                      \
            int nv = (int)((last - unit) < (4 - offset) ? (last - unit) : (4 - offset));   \
            const WTYPE *w = panels + panel * panel_size + offset * LANES * STEP;          \
            const void *next = lookahead && offset == 0 && (panel + 1) * PANEL < N         \
                                   ? panels + (panel + 1) * panel_size : 0;                \
            for (long row = 0; row < M; row += MAX_ROWS) {                                 \
                int rows = (int)(M - row < MAX_ROWS ? M - row : MAX_ROWS);                 \
                const char *ahead = prefetch_target(                                       \
                    next, panel_size * (long)sizeof(WTYPE), row / MAX_ROWS,                \
                    steps * (STEP_LINES));                                                 \
                TILES_##WT[rows - 1][nv - 1](x + row * ldx, ldx, w, steps, acc, ahead);    \
                store_tile(acc, rows, nv, y + row * N, N, unit * LANES, N, bias,           \
                           accumulate);                                                    \
            }                                                                              \
            unit += nv;                                                                    \
        }                                                                                  \
    }

DEFINE_MATMUL_UNITS(f32, float, float, 1, TILE_ROW, PANEL, 1)
/* The same with fp16 panels: half the bytes a single stream reads per token. */
DEFINE_MATMUL_UNITS(f16, float, half_bits, 1, TILE_ROW, PANEL, 1)
/* bf16 panels in K-pairs against rows rounded to bf16 (bf16.h): one copy for every row. */
DEFINE_MATMUL_UNITS(bf16, bf16_act, uint16_t, 2, WHOLE_PANEL_TILE_ROW, 2 * PANEL, 1)
/* int8 blocks of 32 k with their scales (int8.h): 1.125 bytes a weight, every row. */
DEFINE_MATMUL_UNITS(i8, i8_act, uint8_t, I8_BLOCK, WHOLE_PANEL_TILE_ROW, I8_BLOCK_BYTES,
                    I8_BLOCK_LINES)
/* 4-bit blocks with a scale and a minimum (int4.h): 0.75 bytes a weight, every row. */
DEFINE_MATMUL_UNITS(i4, i8_act, uint8_t, I8_BLOCK, WHOLE_PANEL_TILE_ROW, I4_BLOCK_BYTES,
                    I4_BLOCK_LINES)

#if AMX_TILES
/* matmul_units_i8's or _i4's work (nibbles) on 16-row AMX tiles (amx.h): M a multiple of
 * 16, first a panel's first unit (as linear_phase's items are); the same bits, the same
 * prefetch of the next panel by the tiles after a panel's first. */
static void amx_units(int nibbles, const i8_act *x, long ldx, amx_rows rows,
                      const uint8_t *panels, const float *bias, float *y, long M, long K, long N,
                      long first, long last, int accumulate, int lookahead) {
    vecf acc[AMX_ROWS][4];
    long blocks = K / I8_BLOCK;
    long block_bytes = nibbles ? I4_BLOCK_BYTES : I8_BLOCK_BYTES, panel_size = blocks * block_bytes;
    /* 4-bit with two 16-row tiles or more: each panel's nibbles unpacked once for them all */
    uint8_t *bytes = nibbles && M > AMX_ROWS ? aligned_alloc(64, blocks * I8_BLOCK * PANEL) : 0;
    amx_configure();
    for (long unit = first; unit < last; unit += 4) {
        long panel = unit / 4;
        int nv = (int)(last - unit < 4 ? last - unit : 4);
        const uint8_t *w = panels + panel * panel_size;
        const void *next = lookahead && (panel + 1) * PANEL < N ? w + panel_size : 0;
        if (bytes) amx_unpack_panel(w, blocks, bytes);
        for (long row = 0; row < M; row += AMX_ROWS) {
            const char *ahead = /* the first tile: its unit walks read the panel strided */
                prefetch_target(next, panel_size, row / AMX_ROWS + 1, panel_size / 64);
            amx_rows group = amx_rows_from(rows, row);
            if (nibbles)
                amx_tile_i4(x + row * ldx, ldx, group, w, bytes, blocks, nv, acc, ahead);
            else
                amx_tile_i8(x + row * ldx, ldx, group, w, blocks, nv, acc, ahead);
            store_tile(acc, AMX_ROWS, nv, y + row * N, N, unit * LANES, N, bias, accumulate);
        }
    }
    _tile_release(); /* the tile state back to its initial one: cheaper context switches */
    free(bytes);
}
#endif

/* int8 (or 4-bit, nibbles) units: their rows in whole 16s on AMX tiles where in use (rows:
 * their amx_rows, from x's first row), the rest (all of them elsewhere) on
 * matmul_units_i8's (_i4's) own tiles. */
static void matmul_units_quantized(int nibbles, const i8_act *x, long ldx, amx_rows rows,
                                   const uint8_t *panels, const float *bias, float *y, long M,
                                   long K, long N, long first, long last, int accumulate,
                                   int lookahead) {
    long tiled = amx_in_use() ? M / AMX_ROWS * AMX_ROWS : 0;
#if AMX_TILES
    if (tiled)
        amx_units(nibbles, x, ldx, rows, panels, bias, y, tiled, K, N, first, last, accumulate,
                  lookahead);
#else
    (void)rows;
#endif
    if (M == tiled) return;
    x += tiled * ldx, y += tiled * N, M -= tiled;
    if (nibbles)
        matmul_units_i4(x, ldx, panels, bias, y, M, K, N, first, last, accumulate, lookahead);
    else
        matmul_units_i8(x, ldx, panels, bias, y, M, K, N, first, last, accumulate, lookahead);
}

#if AMX_BF16
/* matmul_units_bf16's work on AMX tiles (amx.h), 16 rows at a time, the last tile's rows
 * past M included (rounded_rows_floats keeps them readable; their sums are not stored):
 * first a panel's first unit (as linear_phase's items are). */
static void amx_units_bf16(const bf16_act *x, long ldx, const uint16_t *panels,
                           const float *bias, float *y, long M, long K, long N, long first,
                           long last, int accumulate) {
    vecf acc[AMX_ROWS][4] __attribute__((aligned(64)));
    long pairs = (K + 1) / 2, panel_size = pairs * 2 * PANEL;
    amx_configure_bf16();
    for (long unit = first; unit < last; unit += 4) {
        int nv = (int)(last - unit < 4 ? last - unit : 4);
        const uint16_t *w = panels + unit / 4 * panel_size;
        for (long row = 0; row < M; row += AMX_ROWS) {
            int rows = (int)(M - row < AMX_ROWS ? M - row : AMX_ROWS);
            amx_tile_bf16(x + row * ldx, ldx, w, pairs, acc);
            store_tile(acc, rows, nv, y + row * N, N, unit * LANES, N, bias, accumulate);
        }
    }
    _tile_release();
}
#endif

/* bf16 units: every row on AMX tiles where in use (each row's operations the same for
 * any row count: its own 16-pair chunks in k order), else on matmul_units_bf16's. */
static void matmul_units_bf16_any(const bf16_act *x, long ldx, const uint16_t *panels,
                                  const float *bias, float *y, long M, long K, long N,
                                  long first, long last, int accumulate, int lookahead) {
#if AMX_BF16
    if (amx_in_use()) {
        amx_units_bf16(x, ldx, panels, bias, y, M, K, N, first, last, accumulate);
        return;
    }
#endif
    matmul_units_bf16(x, ldx, panels, bias, y, M, K, N, first, last, accumulate, lookahead);
}

/* A linear layer's packed weight as the kernels see it. Rows of a matmul may take two
 * weight copies: rows [0, split) the first (prompt tokens), the rest the second
 * (generated tokens, fp16 panels with LAMINA_WEIGHT_DTYPE=float16). */
typedef struct {
    const void *panels[2];    /* [ceil(out/64)][in][64] fp32 or fp16; bf16: K-pairs; int8 */
    int32_t kind[2];          /* WEIGHTS_F32, _F16, _BF16, _I8, _I4: how panels[i] is stored */
    const float *bias;        /* [out] or NULL */
    long in_features, out_features;
} linear_desc;

/* Floats of scratch (bf16_act values fit in them) linear_phase needs for M rows of
 * K features: the rows rounded to bf16, when a weight is, or quantized to int8 blocks
 * (int8.h: 40 bytes per 32 features, less than 32 floats). AMX_ROWS - 1 rows more: a
 * 16-row AMX tile of bf16 rows starting at the last row reads them (amx.h); what they
 * hold only reaches outputs that are never stored. */
static inline long rounded_rows_floats(long M, long K) {
    return (M + AMX_ROWS - 1) * bf16_row_width(K);
}

/* Whether weights of this kind multiply rows quantized to int8 blocks (int8.h). */
static inline int quantizes_rows(int32_t kind) { return kind == WEIGHTS_I8 || kind == WEIGHTS_I4; }

/* y[M, out] (=, or += with `accumulate`) x[M, in] . W + bias, shared among the threads of
 * the enclosing parallel region (an orphaned `omp for`; alone outside one). A work item is
 * one panel for a block of up to ROW_BLOCK rows, panel-major: at decode sizes (M <=
 * ROW_BLOCK) that is one panel for every row; for prompts, the rows split too, so the
 * 9 panels of a 576-wide projection no longer leave one thread a panel behind the other
 * (the model's 121 matmuls at 256 / 512 rows: 344.7 / 698.6 -> 335.1 / 679.9 ms). Items
 * are handed out with schedule(guided): long contiguous runs first (as fast as a static
 * split), then single items, so a thread the OS delays (the HTTP event loop, a client on
 * the same cores) leaves its last items to the others instead of making them wait. Only
 * a panel's last row block prefetches the next panel. With bf16 weights the rows of x
 * are first rounded into `rounded` (rounded_rows_floats(M, in) floats, shared), with
 * int8 or 4-bit weights quantized into it (int8.h), one
 * barrier more. Ends with the loop's barrier: y is complete for every thread. */
static void linear_phase(const linear_desc *w, const float *x, long ldx, long M, long split,
                         float *y, int accumulate, void *rounded) {
    long K = w->in_features, N = w->out_features, width = bf16_row_width(K);
    long blocks = K / I8_BLOCK; /* quantized blocks per row (int8 and 4-bit weights) */
    long units = (N + LANES - 1) / LANES, chunks = (units + 3) / 4; /* one panel each */
    long row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    if (w->kind[0] == WEIGHTS_BF16 || w->kind[1] == WEIGHTS_BF16)
        round_rows_bf16(x, ldx, M, K, rounded);
    else if ((quantizes_rows(w->kind[0]) || quantizes_rows(w->kind[1])) && amx_in_use())
        amx_quantize_rows(x, ldx, M, K, rounded); /* and the tables the AMX tiles read */
    else if (quantizes_rows(w->kind[0]) || quantizes_rows(w->kind[1]))
        quantize_rows_i8(x, ldx, M, K, rounded);
    amx_rows tables = rounded ? amx_rows_in(rounded, M, blocks) : (amx_rows){0}; /* for AMX */
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
            const void *panels = w->panels[kind];
            if (w->kind[kind] == WEIGHTS_BF16)
                matmul_units_bf16_any((const bf16_act *)rounded + row * width, width, panels,
                                      w->bias, yr, end - row, K, N, first, last, accumulate,
                                      lookahead);
            else if (quantizes_rows(w->kind[kind]))
                matmul_units_quantized(w->kind[kind] == WEIGHTS_I4,
                                       (const i8_act *)rounded + row * blocks, blocks,
                                       amx_rows_from(tables, row), panels, w->bias, yr,
                                       end - row, K, N, first, last, accumulate, lookahead);
            else if (w->kind[kind] == WEIGHTS_F16)
                matmul_units_f16(xr, ldx, panels, w->bias, yr, end - row, K, N, first, last,
                                 accumulate, lookahead);
            else
                matmul_units_f32(xr, ldx, panels, w->bias, yr, end - row, K, N, first, last,
                                 accumulate, lookahead);
        }
    }
}

/* y[M, N] = x[M, K] . W (+ bias), W packed as panels of `kind` (WEIGHTS_F32, _F16, _BF16,
 * _I8, _I4). */
void lamina_matmul(const float *x, long ldx, const void *panels, int32_t kind, const float *bias,
                   float *y, long M, long K, long N) {
    linear_desc w = {{panels, panels}, {kind, kind}, bias, K, N};
    int scratch = kind == WEIGHTS_BF16 || quantizes_rows(kind);
    void *rounded = scratch ? calloc(rounded_rows_floats(M, K), sizeof(float)) : 0;
    int parallel = M * K * N >= (1L << 18);
#pragma omp parallel if (parallel)
    linear_phase(&w, x, ldx, M, M, y, 0, rounded);
    free(rounded);
}

/* Pack W [N, K] (a Linear's weight, row-major) into panels [ceil(N/64)][K][64], each
 * value through CONVERT. */
#define DEFINE_PACK(NAME, WTYPE, CONVERT)                                                  \
    void NAME(const float *weight, WTYPE *panels, long N, long K) {                        \
        long num_panels = (N + PANEL - 1) / PANEL;                                         \
        _Pragma("omp parallel for")                                                        \
        for (long p = 0; p < num_panels; p++) {                                            \
            for (long k = 0; k < K; k++) {                                                 \
                WTYPE *dst = panels + (p * K + k) * PANEL;                                 \
                for (long c = 0; c < PANEL; c++) {                                         \
                    long n = p * PANEL + c;                                                \
                    dst[c] = CONVERT(n < N ? weight[n * K + k] : 0.0f);                    \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }
DEFINE_PACK(lamina_pack_weight, float, )
DEFINE_PACK(lamina_pack_weight_f16, half_bits, float_to_half) /* rounds to nearest fp16 */

/* The arithmetic ceiling the benchmarks compare against: every thread runs chains of
 * vector FMAs on registers only (12 independent chains, more than the FMA latency needs),
 * no memory traffic, in the widest vectors one register holds (16 lanes with AVX-512, 8
 * otherwise: 12 64-byte chains would not fit AVX2's registers). Returns the FLOPs done;
 * the caller times the call. */
#if defined(__AVX512F__)
typedef vecf vec_register;
#else
typedef vec8 vec_register;
#endif
double lamina_fma_peak(long iterations) {
    double flops = 0.0;
    const int lanes = sizeof(vec_register) / sizeof(float);
#pragma omp parallel reduction(+ : flops)
    {
        const vec_register scale = (vec_register){} + 0.9999999f;
        const vec_register shift = (vec_register){} + 1e-7f;
        vec_register chains[12];
        for (int c = 0; c < 12; c++) chains[c] = (vec_register){} + (float)c;
        for (long i = 0; i < iterations; i++)
            for (int c = 0; c < 12; c++) chains[c] = chains[c] * scale + shift;
        __asm__ volatile("" ::"m"(chains)); /* the results are used: keep the FMAs */
        flops += 2.0 * lanes * 12 * (double)iterations;
    }
    return flops;
}
