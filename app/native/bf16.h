/* Part of kernels.c's one translation unit (after vector.h): the bf16 pieces of the
 * matmul (matmul.h builds its bf16 units from them).
 *
 * bf16 weights are packed as K-pairs: panels [ceil(N/64)][ceil(K/2)][64][2], so a
 * column's weights for k = 2j and 2j + 1 share one 32-bit word (even k in the low half),
 * the layout AVX512-BF16's VDPBF16PS reads. Each matmul input row is rounded to bf16
 * once (round to nearest even), so a product of an activation and a weight is a
 * bf16 x bf16 product: exact in fp32. Per pair, a column's fp32 sum takes the odd k's
 * product first, then the even k's, each as an FMA (Intel's pseudocode for VDPBF16PS;
 * measured bit for bit on Zen 4 over 32M random pairs: odd-first agrees in every case,
 * even-first, a single rounding or the pair summed first do not). The pairs go in k
 * order, as every fp32 sum here does: a row's bits never depend on the other rows.
 *
 * With the instruction (__AVX512BF16__), a tile's step is one VDPBF16PS per row and
 * vector; without it (AVX2, AVX-512 without BF16, aarch64) the same panels are widened
 * in the kernel (a shift or a mask) and the two FMAs are written out, in that order.
 * They agree bit for bit with the instruction except where the instruction flushes
 * denormals (its inputs are never denormal here: the rounding below flushes them; a
 * partial sum below 2^-126 would be flushed by the instruction and kept by the FMAs).
 */
#pragma once
#include "vector.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define BF16_DOT 1
typedef uint16_t bf16_act; /* activations as VDPBF16PS reads them: bf16, in K-pairs */
#else
#define BF16_DOT 0
typedef float bf16_act; /* activations rounded to bf16 and widened back to fp32 */
#endif

typedef uint32_t vecu __attribute__((vector_size(64), aligned(4)));
typedef uint16_t vecu16 __attribute__((vector_size(32), aligned(2)));

/* fp32 bits -> bf16 bits in the low half: round to nearest even; zeros and denormals
 * -> a zero of their sign, as AVX512-BF16's conversions give them (its dot product reads
 * a denormal as zero anyway); infinities stay; a NaN stays a (quiet) NaN. */
static inline vecu bf16_bits(vecu bits) {
    vecu magnitude = bits & 0x7fffffffu;
    vecu rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    vecu nan = (vecu)(magnitude > 0x7f800000u), tiny = (vecu)(magnitude < 0x00800000u);
    vecu quiet_nan = (bits >> 16) | 0x40u, zero = (bits >> 16) & 0x8000u;
    return (rounded & ~(nan | tiny)) | (quiet_nan & nan) | (zero & tiny);
}

/* The same for one value (weight packing, the tail of a row). */
static inline uint16_t bf16_bits_scalar(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    if (magnitude < 0x00800000u) return (uint16_t)((bits >> 16) & 0x8000u); /* 0, denormal */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Values per rounded row: K rounded up to whole chunks of 32 (16 K-pairs: a row of an
 * AMX tile, amx.h), zeros past K, so an AMX tile's last chunk reads zeros, not the next
 * row. The VDPBF16PS tiles read only the ceil(K / 2) pairs. */
#define BF16_CHUNK_VALUES 32
static inline long bf16_row_width(long K) {
    return (K + BF16_CHUNK_VALUES - 1) / BF16_CHUNK_VALUES * BF16_CHUNK_VALUES;
}

/* x [M, K] (row stride ldx) -> out [M, bf16_row_width(K)]: each value rounded to bf16
 * once (zeros after K), shared among the threads of the enclosing parallel region; ends
 * with the loop's barrier, so every thread sees every row. */
static void round_rows_bf16(const float *x, long ldx, long M, long K, bf16_act *out) {
    long width = bf16_row_width(K);
#pragma omp for schedule(static)
    for (long r = 0; r < M; r++) {
        const float *row = x + r * ldx;
        bf16_act *dst = out + r * width;
        long k = 0;
        for (; k + LANES <= K; k += LANES) {
            vecu bits;
            memcpy(&bits, row + k, sizeof bits);
            vecu rounded = bf16_bits(bits);
#if BF16_DOT
            *(vecu16 *)(dst + k) = __builtin_convertvector(rounded, vecu16);
#else
            store(dst + k, (vecf)(rounded << 16));
#endif
        }
        for (; k < width; k++) {
            uint16_t bits = k < K ? bf16_bits_scalar(row[k]) : 0;
#if BF16_DOT
            dst[k] = bits;
#else
            uint32_t wide = (uint32_t)bits << 16;
            memcpy(dst + k, &wide, sizeof wide);
#endif
        }
    }
}

/* A bf16 tile: rows x 4 vectors of 16 columns (a whole panel: the panels are zero past N,
 * and store_tile keeps only the columns asked for), over `pairs` K-pairs in order; x the
 * rounded rows (row stride ldx), w the panel (linear_phase's items start at a panel). One
 * width only: 6 tiles to compile instead of 24 (the kernels' build time counts: every
 * instruction-set level is compiled for the tests), for at most 3 vectors of zeros on a
 * layer's last panel. Each element's step per K-pair: acc += x[2k + 1] * w_odd, then
 * acc += x[2k] * w_even (one VDPBF16PS, or the two FMAs it is equal to). */
#if BF16_DOT
/* One VDPBF16PS per row and vector per K-pair: 24 accumulators, 4 weight vectors. */
#define DEFINE_TILE_BF16(ROWS)                                                             \
    static void tile_bf16_##ROWS##_4(const bf16_act *x, long ldx, const uint16_t *w,       \
                                     long pairs, vecf out[MAX_ROWS][4], const char *ahead) { \
        vecf acc[ROWS][4];                                                                 \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) acc[r][v] = broadcast(0.0f);                       \
        for (long k = 0; k < pairs; k++) {                                                 \
            const uint16_t *wk = w + k * 2 * PANEL;                                        \
            if (ahead) __builtin_prefetch(ahead + k * 64, 0, 2); /* a line per pair */     \
            __m512bh wv[4];                                                                \
            for (int v = 0; v < 4; v++)                                                    \
                wv[v] = (__m512bh)_mm512_loadu_si512((const void *)(wk + v * 2 * LANES));  \
            for (int r = 0; r < ROWS; r++) {                                               \
                uint32_t pair;                                                             \
                memcpy(&pair, x + r * ldx + 2 * k, sizeof pair);                           \
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);                       \
                for (int v = 0; v < 4; v++)                                                \
                    acc[r][v] = (vecf)_mm512_dpbf16_ps((__m512)acc[r][v], a, wv[v]);       \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) out[r][v] = acc[r][v];                             \
    }
#elif defined(__AVX512F__)
/* AVX-512 without the instruction: the 4 vectors of the K-pair widened (a mask for the
 * odd halves, a shift for the even ones), then the two FMAs per row and vector. Walking
 * the K-pairs per group of vectors instead (as below) measured slower here at 8 rows
 * (each walk reads a part of every cache line pair) and no faster at 32. */
#define DEFINE_TILE_BF16(ROWS)                                                             \
    static void tile_bf16_##ROWS##_4(const bf16_act *x, long ldx, const uint16_t *w,       \
                                     long pairs, vecf out[MAX_ROWS][4], const char *ahead) { \
        vecf acc[ROWS][4];                                                                 \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) acc[r][v] = broadcast(0.0f);                       \
        for (long k = 0; k < pairs; k++) {                                                 \
            const uint16_t *wk = w + k * 2 * PANEL;                                        \
            if (ahead) __builtin_prefetch(ahead + k * 64, 0, 2); /* a line per pair */     \
            vecf odd[4], even[4];                                                          \
            for (int v = 0; v < 4; v++) {                                                  \
                vecu bits = *(const vecu *)(wk + v * 2 * LANES);                           \
                odd[v] = (vecf)(bits & 0xffff0000u);                                       \
                even[v] = (vecf)(bits << 16);                                              \
            }                                                                              \
            for (int r = 0; r < ROWS; r++) {                                               \
                vecf x_odd = broadcast(x[r * ldx + 2 * k + 1]);                            \
                vecf x_even = broadcast(x[r * ldx + 2 * k]);                               \
                for (int v = 0; v < 4; v++) {                                              \
                    acc[r][v] = acc[r][v] + x_odd * odd[v];                                \
                    acc[r][v] = acc[r][v] + x_even * even[v];                              \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) out[r][v] = acc[r][v];                             \
    }
#else
/* Without AVX-512 (AVX2's 16 ymm registers, ARM's 32 of 16 bytes), 64-byte accumulators
 * would not fit, and gcc keeps them in memory: the model's matmuls at 32 rows took 15x
 * the fp32 tile's time. So the tile walks its K-pairs once per group of 8-column halves,
 * as many as the registers hold beside the widened weights (a mask for the odd halves, a
 * shift for the even ones) and the row broadcasts, which compilers hoist out of the
 * group's loop: all 8 for one row, 4 for two, 2 for three, else 1 (in 8-lane halves,
 * 1.1-1.6x fp32's time at 32 rows with gcc and clang, no stack access in the K loops).
 * Each element's sum takes the same FMAs in the same order whatever the walk: the same
 * bits. The first walk prefetches. */
typedef vec8 bf16_vec;
typedef uint32_t bf16_word_vec __attribute__((vector_size(32), aligned(4)));
#define BF16_GROUP(ROWS) ((ROWS) == 1 ? 8 : (ROWS) == 2 ? 4 : (ROWS) == 3 ? 2 : 1)
enum { BF16_LANES = sizeof(bf16_vec) / sizeof(float) }; /* columns per vector */
#define DEFINE_TILE_BF16(ROWS)                                                             \
    static void tile_bf16_##ROWS##_4(const bf16_act *x, long ldx, const uint16_t *w,       \
                                     long pairs, vecf out[MAX_ROWS][4], const char *ahead) { \
        enum { G = BF16_GROUP(ROWS) };                                                     \
        for (int first = 0; first < PANEL / BF16_LANES; first += G) {                      \
            bf16_vec acc[ROWS][G];                                                         \
            for (int r = 0; r < ROWS; r++)                                                 \
                for (int g = 0; g < G; g++) acc[r][g] = (bf16_vec){};                      \
            const char *prefetch = first == 0 ? ahead : 0;                                 \
            for (long k = 0; k < pairs; k++) {                                             \
                const uint16_t *wk = w + (k * PANEL + first * BF16_LANES) * 2;             \
                if (prefetch) __builtin_prefetch(prefetch + k * 64, 0, 2); /* line per pair */ \
                for (int g = 0; g < G; g++) {                                              \
                    bf16_word_vec bits = *(const bf16_word_vec *)(wk + g * 2 * BF16_LANES); \
                    bf16_vec odd = (bf16_vec)(bits & 0xffff0000u);                         \
                    bf16_vec even = (bf16_vec)(bits << 16);                                \
                    for (int r = 0; r < ROWS; r++) {                                       \
                        const bf16_act *pair = x + r * ldx + 2 * k;                        \
                        acc[r][g] = acc[r][g] + ((bf16_vec){} + pair[1]) * odd;            \
                        acc[r][g] = acc[r][g] + ((bf16_vec){} + pair[0]) * even;           \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            for (int r = 0; r < ROWS; r++)                                                 \
                memcpy((float *)out[r] + first * BF16_LANES, acc[r], sizeof acc[r]);       \
        }                                                                                  \
    }
#endif
DEFINE_TILE_BF16(1) DEFINE_TILE_BF16(2) DEFINE_TILE_BF16(3)
DEFINE_TILE_BF16(4) DEFINE_TILE_BF16(5) DEFINE_TILE_BF16(6)

/* Pack W [N, K] (a Linear's weight, row-major fp32) into bf16 panels
 * [ceil(N/64)][ceil(K/2)][64][2], rounded as the activations are; zeros past N and K. */
void lamina_pack_weight_bf16(const float *weight, uint16_t *panels, long N, long K) {
    long pairs = (K + 1) / 2, num_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for
    for (long p = 0; p < num_panels; p++)
        for (long j = 0; j < pairs; j++)
            for (long c = 0; c < PANEL; c++)
                for (long half = 0; half < 2; half++) {
                    long n = p * PANEL + c, k = 2 * j + half;
                    float value = n < N && k < K ? weight[n * K + k] : 0.0f;
                    panels[((p * pairs + j) * PANEL + c) * 2 + half] = bf16_bits_scalar(value);
                }
}

/* Whether bf16 matmuls use AVX512-BF16's dot product (1) or widen in the kernel (0). */
int32_t lamina_bf16_dot_product(void) { return BF16_DOT; }
