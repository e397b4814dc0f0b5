/* Part of kernels.c's one translation unit (after int8.h): the 4-bit pieces of the
 * matmul (matmul.h builds its int4 units from them).
 *
 * 4-bit weights are block-quantized along K like int8's (int8.h), asymmetric: each
 * column's weights for 32 consecutive k share an fp32 scale and minimum, each weight is
 * q in [0, 15] with w ~ q * scale + minimum (scale = (largest - smallest) / 15, minimum
 * = smallest), the scheme of llama.cpp's Q4_1, whose files lamina's default model comes
 * from. A block: 4 pairs of quads, each 64 columns x 4 bytes, byte (p, c, i) holding
 * q[8p + i][c] in its low nibble and q[8p + 4 + i][c] in its high one (a 64-byte load
 * and a mask or a shift give one quad of 16 columns, in an int8 dot product's lanes);
 * then the 64 scales and the 64 minima [ceil(N/64)][K/32][1,024 + 256 + 256 bytes]:
 * 0.75 bytes a weight. K must be a multiple of 32.
 *
 * With the activations quantized per block (int8.h: xq, xs and sum(xq)), a column's block
 * is sum x * (q * scale + minimum) ~ xs * (scale * dot + minimum * sum(xq)), dot the exact
 * int32 sum of q * xq (vpdpbusd, or vpmaddubsw: 2 * 15 * 127 cannot saturate). Each
 * element takes two fp32 steps per block, in k order from zero: acc += (float)dot * (xs *
 * scale), then acc += (float)sum(xq) * (xs * minimum); the same on every build.
 */
#pragma once
#include "int8.h"

#define I4_BLOCK_BYTES (I8_BLOCK * PANEL / 2 + 2 * PANEL * 4) /* nibbles, scales, minima */
#define I4_BLOCK_LINES (I4_BLOCK_BYTES / 64)
#define I4_PAIRS (I8_QUADS / 2)

#if QUANT_WIDE
/* As int8.h's groups and tiles, on nibbles. */
#define DEFINE_I4_GROUP(R)                                                                 \
    static inline __attribute__((always_inline)) void i4_group_##R(                        \
        const i8_act *x, long ldx, long b, const uint8_t *block, vecf out[][4]) {          \
        const __m512i low_nibbles = _mm512_set1_epi8(15);                                  \
        __m512i dots[R][4];                                                                \
        for (int r = 0; r < R; r++)                                                        \
            for (int v = 0; v < 4; v++) dots[r][v] = _mm512_setzero_si512();               \
        for (int p = 0; p < I4_PAIRS; p++)                                                 \
            for (int v = 0; v < 4; v++) {                                                  \
                __m512i bytes = _mm512_loadu_si512(block + p * 4 * PANEL + v * 4 * LANES); \
                __m512i low = _mm512_and_si512(bytes, low_nibbles);                        \
                __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles); \
                for (int r = 0; r < R; r++) {                                              \
                    const i8_act *a = x + r * ldx + b;                                     \
                    dots[r][v] = dot_quad_u4(dots[r][v], low,                              \
                                             _mm512_set1_epi32(act_quad(a, 2 * p)));       \
                    dots[r][v] = dot_quad_u4(dots[r][v], high,                             \
                                             _mm512_set1_epi32(act_quad(a, 2 * p + 1)));   \
                }                                                                          \
            }                                                                              \
        const float *scales = (const float *)(block + I8_BLOCK * PANEL / 2);               \
        for (int r = 0; r < R; r++) {                                                      \
            const i8_act *a = x + r * ldx + b;                                             \
            vecf xs = broadcast(a->scale), sum = broadcast((float)a->sum);                 \
            for (int v = 0; v < 4; v++) {                                                  \
                vecf dot = int_to_float(dots[r][v]);                                       \
                out[r][v] = out[r][v] + dot * (xs * load(scales + v * LANES));             \
                out[r][v] = out[r][v] + sum * (xs * load(scales + PANEL + v * LANES));     \
            }                                                                              \
        }                                                                                  \
    }
DEFINE_I4_GROUP(1) DEFINE_I4_GROUP(2) DEFINE_I4_GROUP(3)
#define I4_GROUP_CALL(R, FIRST)                                                            \
    ((R) == 1   ? i4_group_1(x + (FIRST) * ldx, ldx, b, block, out + (FIRST))               \
     : (R) == 2 ? i4_group_2(x + (FIRST) * ldx, ldx, b, block, out + (FIRST))               \
                : i4_group_3(x + (FIRST) * ldx, ldx, b, block, out + (FIRST)))
#define DEFINE_I4_TILE(ROWS)                                                               \
    static void tile_i4_##ROWS##_4(const i8_act *x, long ldx, const uint8_t *w, long blocks, \
                                   vecf out[MAX_ROWS][4], const char *ahead) {             \
        for (int r = 0; r < ROWS; r++)                                                     \
            for (int v = 0; v < 4; v++) out[r][v] = broadcast(0.0f);                       \
        for (long b = 0; b < blocks; b++) {                                                \
            const uint8_t *block = w + b * I4_BLOCK_BYTES;                                 \
            for (int j = 0; ahead && j < I8_QUADS; j++)                                    \
                prefetch_quad_step(ahead + b * I4_BLOCK_BYTES, j, I4_BLOCK_LINES);         \
            ROW_GROUPS(ROWS, I4_GROUP_CALL);                                               \
        }                                                                                  \
    }
#else
#if defined(__AVX2__)
/* The exact dot products over a block of 8 columns' 32 nibbles (pair p's 8 x 4 bytes at
 * w + p * 256) with a row's 32 activations: sum of q * xq per column. */
static inline vec8i block_dot8_u4(const uint8_t *w, const i8_act *a) {
    __m256i acc = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
    __m256i low_nibbles = _mm256_set1_epi8(15);
    for (int p = 0; p < I4_PAIRS; p++) {
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + p * 4 * PANEL));
        __m256i low = _mm256_and_si256(bytes, low_nibbles);
        __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles);
        __m256i pairs = _mm256_maddubs_epi16(low, _mm256_set1_epi32(act_quad(a, 2 * p)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        pairs = _mm256_maddubs_epi16(high, _mm256_set1_epi32(act_quad(a, 2 * p + 1)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
    }
    return (vec8i)acc;
}
#else
static inline vec8i block_dot8_u4(const uint8_t *w, const i8_act *a) {
    vec8i acc = {};
    for (int p = 0; p < I4_PAIRS; p++)
        for (int c = 0; c < 8; c++)
            for (int i = 0; i < 4; i++) {
                uint8_t byte = w[p * 4 * PANEL + 4 * c + i];
                acc[c] += (int32_t)a->q[8 * p + i] * (byte & 15);
                acc[c] += (int32_t)a->q[8 * p + 4 + i] * (byte >> 4);
            }
    return acc;
}
#endif

#define DEFINE_I4_TILE(ROWS)                                                               \
    static void tile_i4_##ROWS##_4(const i8_act *x, long ldx, const uint8_t *w, long blocks, \
                                   vecf out[MAX_ROWS][4], const char *ahead) {             \
        enum { G = BLOCK_GROUP(ROWS) };                                                    \
        for (int first = 0; first < PANEL / 8; first += G) {                               \
            vec8 acc[ROWS][G];                                                             \
            for (int r = 0; r < ROWS; r++)                                                 \
                for (int g = 0; g < G; g++) acc[r][g] = (vec8){};                          \
            for (long b = 0; b < blocks; b++) {                                            \
                const uint8_t *block = w + b * I4_BLOCK_BYTES;                             \
                const float *scales = (const float *)(block + I8_BLOCK * PANEL / 2);       \
                const char *next = ahead && first == 0 ? ahead + b * I4_BLOCK_BYTES : 0;   \
                for (int j = 0; j < I8_QUADS; j++) prefetch_quad_step(next, j, I4_BLOCK_LINES); \
                for (int r = 0; r < ROWS; r++) {                                           \
                    const i8_act *a = x + r * ldx + b;                                     \
                    vec8 xs = (vec8){} + a->scale, sum = (vec8){} + (float)a->sum;         \
                    for (int g = 0; g < G; g++) {                                          \
                        long h = first + g;                                                \
                        vec8 dot = int_to_float8(block_dot8_u4(block + h * 32, a));        \
                        vec8 scale = *(const vec8 *)(scales + h * 8);                      \
                        vec8 least = *(const vec8 *)(scales + PANEL + h * 8);              \
                        acc[r][g] = acc[r][g] + dot * (xs * scale);                        \
                        acc[r][g] = acc[r][g] + sum * (xs * least);                        \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            for (int r = 0; r < ROWS; r++)                                                 \
                memcpy((float *)out[r] + first * 8, acc[r], sizeof acc[r]);                \
        }                                                                                  \
    }
#endif
DEFINE_I4_TILE(1) DEFINE_I4_TILE(2) DEFINE_I4_TILE(3)
DEFINE_I4_TILE(4) DEFINE_I4_TILE(5) DEFINE_I4_TILE(6)

/* Pack W [N, K] (row-major fp32; K a multiple of 32) into 4-bit blocks: per column and
 * block, minimum = smallest w, scale = (largest - smallest) / 15, q = (w - minimum) /
 * scale rounded to nearest even, in [0, 15] (q = 0 where scale is 0), q[k][c] in byte
 * (k / 8, c, k % 4), the low nibble for k % 8 < 4; zero columns past N. */
void lamina_pack_weight_i4(const float *weight, uint8_t *panels, long N, long K) {
    long blocks = K / I8_BLOCK, num_panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel for
    for (long p = 0; p < num_panels; p++)
        for (long b = 0; b < blocks; b++) {
            uint8_t *block = panels + (p * blocks + b) * I4_BLOCK_BYTES;
            float scales[2 * PANEL]; /* the scales, then the minima */
            memset(block, 0, I8_BLOCK * PANEL / 2);
            for (long c = 0; c < PANEL; c++) {
                long n = p * PANEL + c;
                const float *column = n < N ? weight + n * K + b * I8_BLOCK : 0;
                float smallest = column ? column[0] : 0.0f, largest = smallest;
                for (long kk = 1; column && kk < I8_BLOCK; kk++) {
                    smallest = column[kk] < smallest ? column[kk] : smallest;
                    largest = column[kk] > largest ? column[kk] : largest;
                }
                float scale = (largest - smallest) / 15.0f;
                scales[c] = scale, scales[PANEL + c] = smallest;
                for (long kk = 0; column && scale > 0.0f && kk < I8_BLOCK; kk++) {
                    float q = nearbyintf((column[kk] - smallest) / scale);
                    q = q > 15.0f ? 15.0f : q < 0.0f ? 0.0f : q;
                    uint8_t *byte = block + kk / 8 * 4 * PANEL + c * 4 + kk % 4;
                    *byte |= (uint8_t)q << (kk % 8 < 4 ? 0 : 4);
                }
            }
            memcpy(block + I8_BLOCK * PANEL / 2, scales, sizeof scales);
        }
}
