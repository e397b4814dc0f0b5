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

/* x [M, K] (row stride ldx) -> out [M, K rounded up to even]: each value rounded to
 * bf16 once (a zero after K when K is odd), shared among the threads of the enclosing
 * parallel region; ends with the loop's barrier, so every thread sees every row. */
static void round_rows_bf16(const float *x, long ldx, long M, long K, bf16_act *out) {
    long width = (K + 1) / 2 * 2;
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

/* One K-pair of a tile: acc[r][v] += x[r][2k + 1] * w_odd[v], then += x[r][2k] * w_even[v]
 * (wk: the pair's 64 columns x 2, from the tile's first column). */
#if BF16_DOT
#define BF16_PAIR_STEP(ROWS, NV)                                                           \
    __m512bh wv[NV];                                                                       \
    for (int v = 0; v < NV; v++)                                                           \
        wv[v] = (__m512bh)_mm512_loadu_si512((const void *)(wk + v * 2 * LANES));          \
    for (int r = 0; r < ROWS; r++) {                                                       \
        uint32_t pair;                                                                     \
        memcpy(&pair, x + r * ldx + 2 * k, sizeof pair);                                   \
        __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);                               \
        for (int v = 0; v < NV; v++)                                                       \
            acc[r][v] = (vecf)_mm512_dpbf16_ps((__m512)acc[r][v], a, wv[v]);               \
    }
#else
#define BF16_PAIR_STEP(ROWS, NV)                                                           \
    vecf odd[NV], even[NV];                                                                \
    for (int v = 0; v < NV; v++) {                                                         \
        vecu bits = *(const vecu *)(wk + v * 2 * LANES);                                   \
        odd[v] = (vecf)(bits & 0xffff0000u);                                               \
        even[v] = (vecf)(bits << 16);                                                      \
    }                                                                                      \
    for (int r = 0; r < ROWS; r++) {                                                       \
        vecf x_odd = broadcast(x[r * ldx + 2 * k + 1]), x_even = broadcast(x[r * ldx + 2 * k]); \
        for (int v = 0; v < NV; v++) {                                                     \
            acc[r][v] = acc[r][v] + x_odd * odd[v];                                        \
            acc[r][v] = acc[r][v] + x_even * even[v];                                      \
        }                                                                                  \
    }
#endif

/* A bf16 tile: rows x 4 vectors of 16 columns (a whole panel: the panels are zero past N,
 * and store_tile keeps only the columns asked for), over `pairs` K-pairs in order; x the
 * rounded rows (row stride ldx), w the panel (linear_phase's items start at a panel). One width only: 6 tiles to compile instead
 * of 24 (the kernels' build time counts: every instruction-set level is compiled for the
 * tests), for at most 3 vectors of zeros on a layer's last panel. */
#define DEFINE_TILE_BF16(ROWS, NV)                                                         \
    static void tile_bf16_##ROWS##_##NV(const bf16_act *x, long ldx, const uint16_t *w,    \
                                        long pairs, vecf out[MAX_ROWS][4],                 \
                                        const char *ahead) {                               \
        vecf acc[ROWS][NV];                                                                \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < NV; v++) acc[r][v] = broadcast(0.0f);                      \
        for (long k = 0; k < pairs; k++) {                                                 \
            const uint16_t *wk = w + k * 2 * PANEL;                                        \
            if (ahead) __builtin_prefetch(ahead + k * 64, 0, 2); /* a line per pair */     \
            BF16_PAIR_STEP(ROWS, NV)                                                       \
        }                                                                                  \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < NV; v++) out[r][v] = acc[r][v];                            \
    }
DEFINE_TILE_BF16(1, 4) DEFINE_TILE_BF16(2, 4) DEFINE_TILE_BF16(3, 4)
DEFINE_TILE_BF16(4, 4) DEFINE_TILE_BF16(5, 4) DEFINE_TILE_BF16(6, 4)

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
