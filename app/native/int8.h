/* Part of kernels.c's one translation unit (after vector.h): the int8 pieces of the
 * matmul (matmul.h builds its int8 units from them).
 *
 * int8 weights are block-quantized along K, symmetric: each column's weights for 32
 * consecutive k share one fp32 scale (its largest magnitude / 127), each weight is
 * round(w / scale) in [-127, 127]. A panel of 64 columns is stored block by block:
 * [ceil(N/64)][K/32][32 x 64 int8, k-major | 64 fp32 scales], 2,304 bytes a block, so a
 * single stream reads 1.125 bytes per weight instead of fp32's 4 (and one pointer still
 * describes a layer's weights). K must be a multiple of 32 (every layer of the model
 * families served has one; a layer without is packed in fp32 by the caller).
 *
 * The kernel widens each int8 weight to fp32 in registers and multiplies it by its
 * column's scale, then accumulates x[k] * that in fp32, k in order from zero: the
 * operations of the fp32 tile on dequantized weights, so a row's bits never depend on
 * the other rows, the thread count or how the work is split. The activations stay fp32
 * (weight-only quantization: measured against quantizing the rows too in
 * docs/performance.md).
 */
#pragma once
#include "vector.h"

#define I8_BLOCK 32                                    /* k per scale */
#define I8_BLOCK_BYTES (I8_BLOCK * PANEL + PANEL * 4) /* weights, then the 64 scales */
#define I8_BLOCK_LINES (I8_BLOCK_BYTES / 64)          /* cache lines a block spans */

typedef int8_t vec16i8 __attribute__((vector_size(16), aligned(1)));
typedef int8_t vec8i8 __attribute__((vector_size(8), aligned(1)));

/* 16 (or 8) int8 -> floats (exact). GCC turns a direct int8 -> float vector conversion
 * into one scalar conversion per lane (measured: the int8 matmul at 8 rows ran at 0.12x
 * fp32's speed), so x86 gets the sign-extension and conversion instructions themselves,
 * and other machines the conversion in two steps (int8 -> int32 -> float). */
typedef int32_t veci8 __attribute__((vector_size(32), aligned(4)));
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vecf widen_i8(const int8_t *p) {
    return (vecf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#endif
#if defined(__AVX2__)
#include <immintrin.h>
static inline vec8 widen8_i8(const int8_t *p) {
    return (vec8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
static inline vec8 widen8_i8(const int8_t *p) {
    veci8 wide = __builtin_convertvector(*(const vec8i8 *)p, veci8);
    return __builtin_convertvector(wide, vec8);
}
#endif

/* Prefetch the kk-th step's share of a block of `lines` cache lines of the next panel (a
 * tile after the first of a panel fetches the next one meanwhile, as the fp32 tiles do):
 * 32 steps, a line each, and the lines past 32 (at most 32 more) on the first steps. */
static inline void prefetch_block_step(const char *block, int kk, int lines) {
    if (!block) return;
    if (kk < lines) __builtin_prefetch(block + kk * 64, 0, 2);
    if (kk < lines - I8_BLOCK) __builtin_prefetch(block + (I8_BLOCK + kk) * 64, 0, 2);
}

/* A tile of blocks, for int8 and 4-bit panels alike: rows x 4 vectors of 16 columns (a
 * whole panel, as bf16's tiles: the panels are zero past N and store_tile keeps the
 * columns asked for), over `blocks` blocks of 32 k in order; w the panel, x fp32 rows
 * (row stride ldx). A block is 32 rows of ROW_BYTES bytes (one k each), then 64 fp32
 * scales, then (MINIMA) 64 fp32 minima. WIDEN(k_row, v) gives the 16 weights of unit v of
 * a k's row as floats, WIDEN8(k_row, h) the 8 of half h. Each element's step per k:
 * acc += x[k] * (q * scale (+ minimum)). */
#if defined(__AVX512F__)
#define DEFINE_BLOCK_TILE(NAME, WTYPE, ROWS, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)  \
    static void tile_##NAME##_##ROWS##_4(const float *x, long ldx, const WTYPE *w,        \
                                         long blocks, vecf out[MAX_ROWS][4],              \
                                         const char *ahead) {                             \
        vecf acc[ROWS][4];                                                                 \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) acc[r][v] = broadcast(0.0f);                       \
        for (long b = 0; b < blocks; b++) {                                                \
            const WTYPE *block = w + b * (BLOCK_BYTES);                                    \
            const float *scales = (const float *)(block + I8_BLOCK * (ROW_BYTES));         \
            const char *next = ahead ? ahead + b * (BLOCK_BYTES) : 0;                      \
            const float *xb = x + b * I8_BLOCK;                                            \
            vecf scale[4], least[4];                                                       \
            for (int v = 0; v < 4; v++) {                                                  \
                scale[v] = load(scales + v * LANES);                                       \
                least[v] = MINIMA ? load(scales + PANEL + v * LANES) : broadcast(0.0f);    \
            }                                                                              \
            for (int kk = 0; kk < I8_BLOCK; kk++) {                                        \
                prefetch_block_step(next, kk, (BLOCK_BYTES) / 64);                         \
                vecf wv[4];                                                                \
                for (int v = 0; v < 4; v++) {                                              \
                    vecf q = WIDEN(block + kk * (ROW_BYTES), v);                           \
                    wv[v] = MINIMA ? q * scale[v] + least[v] : q * scale[v];               \
                }                                                                          \
                for (int r = 0; r < ROWS; r++) {                                           \
                    vecf a = broadcast(xb[r * ldx + kk]);                                  \
                    for (int v = 0; v < 4; v++) acc[r][v] = acc[r][v] + a * wv[v];         \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) out[r][v] = acc[r][v];                             \
    }
#else
/* Without AVX-512, in 8-column halves, as many per walk over the blocks as the 16
 * registers hold beside their scales and widened weights: 4 for one row, 2 for up to
 * four, else 1 (see matmul.h's TILE8_WALK for why). The same operations per element:
 * the same bits. */
#define BLOCK_GROUP(ROWS) ((ROWS) == 1 ? 4 : (ROWS) <= 4 ? 2 : 1)
#define DEFINE_BLOCK_TILE(NAME, WTYPE, ROWS, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)  \
    static void tile_##NAME##_##ROWS##_4(const float *x, long ldx, const WTYPE *w,        \
                                         long blocks, vecf out[MAX_ROWS][4],              \
                                         const char *ahead) {                             \
        enum { G = BLOCK_GROUP(ROWS) };                                                    \
        for (int first = 0; first < PANEL / 8; first += G) {                               \
            vec8 acc[ROWS][G];                                                             \
            for (int r = 0; r < ROWS; r++)                                                 \
                for (int g = 0; g < G; g++) acc[r][g] = (vec8){};                          \
            for (long b = 0; b < blocks; b++) {                                            \
                const WTYPE *block = w + b * (BLOCK_BYTES);                                \
                const float *scales = (const float *)(block + I8_BLOCK * (ROW_BYTES));     \
                const char *next = ahead && first == 0 ? ahead + b * (BLOCK_BYTES) : 0;    \
                const float *xb = x + b * I8_BLOCK;                                        \
                vec8 scale[G], least[G];                                                   \
                for (int g = 0; g < G; g++) {                                              \
                    scale[g] = *(const vec8 *)(scales + (first + g) * 8);                  \
                    least[g] = MINIMA ? *(const vec8 *)(scales + PANEL + (first + g) * 8)  \
                                      : (vec8){};                                          \
                }                                                                          \
                for (int kk = 0; kk < I8_BLOCK; kk++) {                                    \
                    prefetch_block_step(next, kk, (BLOCK_BYTES) / 64);                     \
                    vec8 wv[G];                                                            \
                    for (int g = 0; g < G; g++) {                                          \
                        vec8 q = WIDEN8(block + kk * (ROW_BYTES), first + g);              \
                        wv[g] = MINIMA ? q * scale[g] + least[g] : q * scale[g];           \
                    }                                                                      \
                    for (int r = 0; r < ROWS; r++) {                                       \
                        vec8 a = (vec8){} + xb[r * ldx + kk]; /* as broadcast() makes it */ \
                        for (int g = 0; g < G; g++) acc[r][g] = acc[r][g] + a * wv[g];     \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            for (int r = 0; r < ROWS; r++)                                                 \
                memcpy((float *)out[r] + first * 8, acc[r], sizeof acc[r]);                \
        }                                                                                  \
    }
#endif
#define DEFINE_BLOCK_TILES(NAME, WTYPE, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)      \
    DEFINE_BLOCK_TILE(NAME, WTYPE, 1, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)        \
    DEFINE_BLOCK_TILE(NAME, WTYPE, 2, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)        \
    DEFINE_BLOCK_TILE(NAME, WTYPE, 3, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)        \
    DEFINE_BLOCK_TILE(NAME, WTYPE, 4, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)        \
    DEFINE_BLOCK_TILE(NAME, WTYPE, 5, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)        \
    DEFINE_BLOCK_TILE(NAME, WTYPE, 6, BLOCK_BYTES, ROW_BYTES, MINIMA, WIDEN, WIDEN8)

/* Unit v (16 weights) / half h (8) of one k's 64 int8 weights, as floats. */
#if defined(__AVX512F__)
static inline vecf widen_i8_unit(const int8_t *k_row, int v) { return widen_i8(k_row + v * LANES); }
#else
#define widen_i8_unit(k_row, v) broadcast(0.0f) /* unused without AVX-512 */
#endif
static inline vec8 widen8_i8_half(const int8_t *k_row, int h) { return widen8_i8(k_row + h * 8); }
DEFINE_BLOCK_TILES(i8, int8_t, I8_BLOCK_BYTES, PANEL, 0, widen_i8_unit, widen8_i8_half)

/* Pack W [N, K] (a Linear's weight, row-major fp32; K a multiple of 32) into int8 blocks
 * [ceil(N/64)][K/32][32 x 64 int8 | 64 fp32 scales]: per column and block, scale = its
 * largest |w| / 127 (0 for an all-zero block) and q = w / scale rounded to nearest even;
 * zero columns past N. */
void lamina_pack_weight_i8(const float *weight, int8_t *panels, long N, long K) {
    long blocks = K / I8_BLOCK, num_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for
    for (long p = 0; p < num_panels; p++)
        for (long b = 0; b < blocks; b++) {
            int8_t *block = panels + (p * blocks + b) * I8_BLOCK_BYTES;
            float scales[PANEL];
            for (long c = 0; c < PANEL; c++) {
                long n = p * PANEL + c;
                float largest = 0.0f;
                for (long kk = 0; n < N && kk < I8_BLOCK; kk++) {
                    float magnitude = fabsf(weight[n * K + b * I8_BLOCK + kk]);
                    largest = magnitude > largest ? magnitude : largest;
                }
                float scale = largest / 127.0f;
                scales[c] = scale;
                for (long kk = 0; kk < I8_BLOCK; kk++) {
                    float value = n < N && scale > 0.0f ? weight[n * K + b * I8_BLOCK + kk] : 0.0f;
                    float q = scale > 0.0f ? nearbyintf(value / scale) : 0.0f;
                    q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
                    block[kk * PANEL + c] = (int8_t)q;
                }
            }
            memcpy(block + I8_BLOCK * PANEL, scales, sizeof scales);
        }
}
