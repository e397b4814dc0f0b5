/* Part of kernels.c's one translation unit (after vector.h): the int8 pieces of the
 * matmul (matmul.h builds its int8 units from them), and what int4.h shares with them.
 *
 * int8 weights are block-quantized along K, symmetric: each column's weights for 32
 * consecutive k share one fp32 scale (its largest magnitude / 127), each weight is
 * q = round(w / scale) in [-127, 127]. A panel of 64 columns is stored block by block:
 * [ceil(N/64)][K/32][8 quads x 64 columns x 4 bytes | 64 fp32 scales], 2,304 bytes a
 * block, where byte (j, c, i) is q[4j + i][c] + 128 (unsigned): a column's four
 * consecutive k share 32 bits, the layout of an int8 dot product's lane. A single stream
 * reads 1.125 bytes per weight instead of fp32's 4. K must be a multiple of 32 (every
 * layer of the model families served has one; a layer without is packed in fp32 by the
 * caller).
 *
 * The activations are quantized too, per row and block of 32 k (quantize_rows_i8):
 * xs = max|x| / 127, xq = round(x / xs) in [-127, 127], and the block's sum of xq. Each
 * block's dot product of xq with a column's q is an exact int32 (AVX512-VNNI vpdpbusd on
 * the unsigned bytes, less 128 * sum(xq); without VNNI, vpmaddubsw on |xq| and q with
 * xq's sign, which cannot saturate: |xq|, |q| <= 127), and each output element takes one
 * fp32 step per block, in k order from zero: acc += (float)dot * (xs * scale). Integer
 * sums are exact and the rows are quantized alone, so a row's bits never depend on the
 * other rows, the thread count, the split of the work, or the instruction set (every
 * build, the 8-lane AVX2 and portable ones too, takes the same steps).
 */
#pragma once
#include "vector.h"

#define I8_BLOCK 32                                    /* k per scale */
#define I8_QUADS (I8_BLOCK / 4)                        /* groups of 4 k in a block */
#define I8_BLOCK_BYTES (I8_BLOCK * PANEL + PANEL * 4) /* weights, then the 64 scales */
#define I8_BLOCK_LINES (I8_BLOCK_BYTES / 64)          /* cache lines a block spans */

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
/* The dot products: AVX-512 in 16-column units (vpdpbusd with VNNI, else vpmaddubsw), AVX2
 * in 8-column halves (vpmaddubsw), elsewhere in plain C on 8 columns. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QUANT_WIDE 1
#else
#define QUANT_WIDE 0
#endif

/* One row's block of 32 activations, quantized (quantize_rows_i8): 40 bytes. */
typedef struct {
    int8_t q[I8_BLOCK];
    float scale;  /* xs: x ~ q * scale */
    int32_t sum;  /* of q */
} i8_act;

/* Quantize one block of 32 floats: scale = largest |x| / 127, q = x * (1 / scale)
 * rounded to nearest even (the vector and scalar code take the same steps). */
static inline void quantize_block_i8(const float *x, i8_act *out) {
#if defined(__AVX512F__)
    __m512 low = _mm512_loadu_ps(x), high = _mm512_loadu_ps(x + 16);
    float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
    float scale = largest / 127.0f, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    __m512 times = _mm512_set1_ps(inverse);
    __m512i bound = _mm512_set1_epi32(127), least = _mm512_set1_epi32(-127);
    __m512i qlow = _mm512_cvtps_epi32(_mm512_mul_ps(low, times));
    __m512i qhigh = _mm512_cvtps_epi32(_mm512_mul_ps(high, times));
    qlow = _mm512_max_epi32(_mm512_min_epi32(qlow, bound), least);
    qhigh = _mm512_max_epi32(_mm512_min_epi32(qhigh, bound), least);
    _mm_storeu_si128((__m128i *)out->q, _mm512_cvtepi32_epi8(qlow));
    _mm_storeu_si128((__m128i *)(out->q + 16), _mm512_cvtepi32_epi8(qhigh));
    out->sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlow, qhigh));
#else
    float largest = 0.0f;
    for (int k = 0; k < I8_BLOCK; k++) largest = fmaxf(largest, fabsf(x[k]));
    float scale = largest / 127.0f, inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    int32_t sum = 0;
    for (int k = 0; k < I8_BLOCK; k++) {
        float q = nearbyintf(x[k] * inverse);
        q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
        out->q[k] = (int8_t)q;
        sum += (int32_t)q;
    }
    out->sum = sum;
#endif
    out->scale = scale;
}

/* Rows x [M, K] (row stride ldx) -> out [M][K / 32] quantized blocks, shared among the
 * threads of the enclosing parallel region; ends with the loop's barrier. */
static void quantize_rows_i8(const float *x, long ldx, long M, long K, i8_act *out) {
    long blocks = K / I8_BLOCK;
#pragma omp for schedule(static)
    for (long r = 0; r < M; r++)
        for (long b = 0; b < blocks; b++) quantize_block_i8(x + r * ldx + b * I8_BLOCK, out + r * blocks + b);
}

/* Prefetch the j-th of I8_QUADS steps' share of a block of `lines` cache lines of the
 * next panel (a tile after the first of a panel fetches the next one meanwhile, as the
 * fp32 tiles do). */
static inline void prefetch_quad_step(const char *block, int j, int lines) {
    if (!block) return;
    for (int line = j * lines / I8_QUADS; line < (j + 1) * lines / I8_QUADS; line++)
        __builtin_prefetch(block + line * 64, 0, 2);
}

/* The 4 activations of quad j of a row's block, as one 32-bit value. */
static inline int32_t act_quad(const i8_act *a, int j) {
    int32_t quad;
    memcpy(&quad, a->q + 4 * j, sizeof quad);
    return quad;
}

#if QUANT_WIDE
/* acc + the dot products of 16 columns' 4 weights (w: unsigned q + 128 for int8, or
 * nibbles 0..15 for int4) with 4 activations (a: the quad broadcast to every lane).
 * With VNNI the result includes 128 * sum(a) for int8 (I8_DOT_OFFSET), removed per
 * block; vpmaddubsw's pairs stay below 2 * 127 * 128 (int8, on |a| and q signed by a)
 * or 2 * 15 * 127 (nibbles): no saturation. */
#if defined(__AVX512VNNI__)
#define I8_DOT_OFFSET 128
static inline __m512i dot_quad_i8(__m512i acc, __m512i w, __m512i a) {
    return _mm512_dpbusd_epi32(acc, w, a);
}
static inline __m512i dot_quad_u4(__m512i acc, __m512i nibbles, __m512i a) {
    return _mm512_dpbusd_epi32(acc, nibbles, a);
}
#else
#define I8_DOT_OFFSET 0
static inline __m512i dot_quad_i8(__m512i acc, __m512i w, __m512i a) {
    __m512i q = _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)); /* signed q */
    __m512i signed_q = _mm512_mask_sub_epi8(q, _mm512_movepi8_mask(a), _mm512_setzero_si512(), q);
    __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(a), signed_q);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}
static inline __m512i dot_quad_u4(__m512i acc, __m512i nibbles, __m512i a) {
    __m512i pairs = _mm512_maddubs_epi16(nibbles, a);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}
#endif
static inline vecf int_to_float(__m512i v) { return (vecf)_mm512_cvtepi32_ps(v); }

/* Rows [0, R) of x (row stride ldx blocks) against block b of a panel (4 units of 16
 * columns): the int32 dot products in 4R registers (R <= 3 leaves room for the weights
 * and broadcasts; at 6 rows gcc spilled most of 24), then one fp32 step per element in
 * out (L1). */
#define DEFINE_I8_GROUP(R)                                                                 \
    static inline __attribute__((always_inline)) void i8_group_##R(                        \
        const i8_act *x, long ldx, long b, const uint8_t *block, vecf out[][4]) {          \
        __m512i dots[R][4];                                                                \
        for (int r = 0; r < R; r++)                                                        \
            for (int v = 0; v < 4; v++) dots[r][v] = _mm512_setzero_si512();               \
        for (int j = 0; j < I8_QUADS; j++)                                                 \
            for (int v = 0; v < 4; v++) {                                                  \
                __m512i wv = _mm512_loadu_si512(block + j * 4 * PANEL + v * 4 * LANES);    \
                for (int r = 0; r < R; r++) {                                              \
                    __m512i a = _mm512_set1_epi32(act_quad(x + r * ldx + b, j));           \
                    dots[r][v] = dot_quad_i8(dots[r][v], wv, a);                           \
                }                                                                          \
            }                                                                              \
        const float *scales = (const float *)(block + I8_BLOCK * PANEL);                   \
        for (int r = 0; r < R; r++) {                                                      \
            const i8_act *a = x + r * ldx + b;                                             \
            __m512i offset = _mm512_set1_epi32(I8_DOT_OFFSET * a->sum);                    \
            vecf xs = broadcast(a->scale);                                                 \
            for (int v = 0; v < 4; v++) {                                                  \
                vecf dot = int_to_float(_mm512_sub_epi32(dots[r][v], offset));             \
                out[r][v] = out[r][v] + dot * (xs * load(scales + v * LANES));             \
            }                                                                              \
        }                                                                                  \
    }
DEFINE_I8_GROUP(1) DEFINE_I8_GROUP(2) DEFINE_I8_GROUP(3)

/* Rows of a tile in groups of at most 3 (1..3: one group; 4: 2 + 2; 5: 3 + 2; 6: 3 + 3),
 * each group's call `GROUP##R(first_row_offset, rows_out)`. */
#define ROW_GROUPS(ROWS, CALL)                                                             \
    do {                                                                                   \
        if ((ROWS) <= 3) {                                                                 \
            CALL((ROWS), 0);                                                               \
        } else {                                                                           \
            CALL(((ROWS) + 1) / 2, 0);                                                     \
            CALL((ROWS) / 2, ((ROWS) + 1) / 2);                                            \
        }                                                                                  \
    } while (0)

/* An int8 tile: rows x 4 units of 16 columns (a whole panel: the panels are zero past N
 * and store_tile keeps the columns asked for), over `blocks` blocks in order; x the rows'
 * quantized blocks (row stride ldx blocks); the fp32 sums in `out`. */
#define I8_GROUP_CALL(R, FIRST)                                                            \
    ((R) == 1   ? i8_group_1(x + (FIRST) * ldx, ldx, b, block, out + (FIRST))               \
     : (R) == 2 ? i8_group_2(x + (FIRST) * ldx, ldx, b, block, out + (FIRST))               \
                : i8_group_3(x + (FIRST) * ldx, ldx, b, block, out + (FIRST)))
#define DEFINE_I8_TILE(ROWS)                                                               \
    static void tile_i8_##ROWS##_4(const i8_act *x, long ldx, const uint8_t *w, long blocks, \
                                   vecf out[MAX_ROWS][4], const char *ahead) {             \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) out[r][v] = broadcast(0.0f);                       \
        for (long b = 0; b < blocks; b++) {                                                \
            const uint8_t *block = w + b * I8_BLOCK_BYTES;                                 \
            for (int j = 0; ahead && j < I8_QUADS; j++)                                    \
                prefetch_quad_step(ahead + b * I8_BLOCK_BYTES, j, I8_BLOCK_LINES);         \
            ROW_GROUPS(ROWS, I8_GROUP_CALL);                                               \
        }                                                                                  \
    }
#else
/* Without AVX-512 (AVX2's 16 registers, or plain C), in 8-column halves, as many per walk
 * over the blocks as the registers hold: 4 for one row, 2 for up to four, else 1. The
 * same integer dot products and the same fp32 step per block: the same bits. */
#define BLOCK_GROUP(ROWS) ((ROWS) == 1 ? 4 : (ROWS) <= 4 ? 2 : 1)
typedef int32_t vec8i __attribute__((vector_size(32), aligned(4)));
#if defined(__AVX2__)
/* The exact dot products over a block of 8 columns' 32 weights (quad j's 8 x 4 bytes at
 * w + j * 256) with a row's 32 activations: sum of q * xq per column. */
static inline vec8i block_dot8_i8(const uint8_t *w, const i8_act *a) {
    __m256i acc = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
    for (int j = 0; j < I8_QUADS; j++) {
        __m256i xq = _mm256_set1_epi32(act_quad(a, j));
        __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + j * 4 * PANEL)),
                                     _mm256_set1_epi8((char)0x80));
        __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(xq, xq), _mm256_sign_epi8(q, xq));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
    }
    return (vec8i)acc;
}
#else
static inline vec8i block_dot8_i8(const uint8_t *w, const i8_act *a) {
    vec8i acc = {};
    for (int j = 0; j < I8_QUADS; j++)
        for (int c = 0; c < 8; c++)
            for (int i = 0; i < 4; i++)
                acc[c] += (int32_t)a->q[4 * j + i] * ((int32_t)w[j * 4 * PANEL + 4 * c + i] - 128);
    return acc;
}
#endif
static inline vec8 int_to_float8(vec8i v) { return __builtin_convertvector(v, vec8); }

#define DEFINE_I8_TILE(ROWS)                                                               \
    static void tile_i8_##ROWS##_4(const i8_act *x, long ldx, const uint8_t *w, long blocks, \
                                   vecf out[MAX_ROWS][4], const char *ahead) {             \
        enum { G = BLOCK_GROUP(ROWS) };                                                    \
        for (int first = 0; first < PANEL / 8; first += G) {                               \
            vec8 acc[ROWS][G];                                                             \
            for (int r = 0; r < ROWS; r++)                                                 \
                for (int g = 0; g < G; g++) acc[r][g] = (vec8){};                          \
            for (long b = 0; b < blocks; b++) {                                            \
                const uint8_t *block = w + b * I8_BLOCK_BYTES;                             \
                const float *scales = (const float *)(block + I8_BLOCK * PANEL);           \
                const char *next = ahead && first == 0 ? ahead + b * I8_BLOCK_BYTES : 0;   \
                for (int j = 0; j < I8_QUADS; j++) prefetch_quad_step(next, j, I8_BLOCK_LINES); \
                for (int r = 0; r < ROWS; r++) {                                           \
                    const i8_act *a = x + r * ldx + b;                                     \
                    vec8 xs = (vec8){} + a->scale;                                         \
                    for (int g = 0; g < G; g++) {                                          \
                        long h = first + g;                                                \
                        vec8 dot = int_to_float8(block_dot8_i8(block + h * 32, a));        \
                        vec8 scale = *(const vec8 *)(scales + h * 8);                      \
                        acc[r][g] = acc[r][g] + dot * (xs * scale);                        \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            for (int r = 0; r < ROWS; r++)                                                 \
                memcpy((float *)out[r] + first * 8, acc[r], sizeof acc[r]);                \
        }                                                                                  \
    }
#endif
DEFINE_I8_TILE(1) DEFINE_I8_TILE(2) DEFINE_I8_TILE(3)
DEFINE_I8_TILE(4) DEFINE_I8_TILE(5) DEFINE_I8_TILE(6)

/* Pack W [N, K] (a Linear's weight, row-major fp32; K a multiple of 32) into int8 blocks
 * [ceil(N/64)][K/32][8 x 64 x 4 bytes | 64 fp32 scales]: per column and block, scale =
 * its largest |w| / 127 (0 for an all-zero block) and q = w / scale rounded to nearest
 * even, stored as q + 128 at byte (k / 4, column, k % 4); zero columns past N. */
void lamina_pack_weight_i8(const float *weight, uint8_t *panels, long N, long K) {
    long blocks = K / I8_BLOCK, num_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for
    for (long p = 0; p < num_panels; p++)
        for (long b = 0; b < blocks; b++) {
            uint8_t *block = panels + (p * blocks + b) * I8_BLOCK_BYTES;
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
                    block[kk / 4 * 4 * PANEL + c * 4 + kk % 4] = (uint8_t)((int)q + 128);
                }
            }
            memcpy(block + I8_BLOCK * PANEL, scales, sizeof scales);
        }
}
