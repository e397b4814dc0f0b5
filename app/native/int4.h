/* Part of kernels.c's one translation unit (after int8.h): the 4-bit pieces of the
 * matmul (matmul.h builds its int4 units from them).
 *
 * 4-bit weights are block-quantized along K like int8's (int8.h), asymmetric: each
 * column's weights for 32 consecutive k share an fp32 scale and minimum, each weight is
 * q in [0, 15] with w ~ q * scale + minimum (scale = (largest - smallest) / 15, minimum
 * = smallest), the scheme of llama.cpp's Q4_1, whose files lamina's default model comes
 * from. A block: for each of the 32 k, 32 bytes holding column j in the low nibble of
 * byte j and column j + 32 in its high nibble; then the 64 scales and the 64 minima
 * [ceil(N/64)][K/32][1,024 + 256 + 256 bytes]: 0.75 bytes a weight. K must be a multiple
 * of 32.
 *
 * The kernel widens each nibble to fp32 and takes q * scale + minimum (one FMA), then
 * accumulates x[k] * that in fp32, k in order from zero: the same operations whatever the
 * rows, threads or split, as the other tiles.
 */
#pragma once
#include "int8.h"

#define I4_BLOCK_BYTES (I8_BLOCK * PANEL / 2 + 2 * PANEL * 4) /* nibbles, scales, minima */
#define I4_BLOCK_LINES (I4_BLOCK_BYTES / 64)

/* The 16 nibbles of columns 16v .. 16v + 15 of one k's 32 bytes, as floats (exact). */
#if defined(__AVX512F__)
static inline vecf widen_nibbles(const uint8_t *k_bytes, int v) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(k_bytes + v % 2 * 16)));
    __m512i nibbles = v < 2 ? _mm512_and_si512(bytes, _mm512_set1_epi32(15))
                            : _mm512_srli_epi32(bytes, 4);
    return (vecf)_mm512_cvtepi32_ps(nibbles);
}
#endif
/* The same for the 8 columns of half h (8h .. 8h + 7). */
#if defined(__AVX2__)
static inline vec8 widen8_nibbles(const uint8_t *k_bytes, int h) {
    __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(k_bytes + h % 4 * 8)));
    __m256i nibbles = h < 4 ? _mm256_and_si256(bytes, _mm256_set1_epi32(15))
                            : _mm256_srli_epi32(bytes, 4);
    return (vec8)_mm256_cvtepi32_ps(nibbles);
}
#else
typedef uint8_t vec8u8 __attribute__((vector_size(8), aligned(1)));
static inline vec8 widen8_nibbles(const uint8_t *k_bytes, int h) {
    veci8 bytes = __builtin_convertvector(*(const vec8u8 *)(k_bytes + h % 4 * 8), veci8);
    veci8 nibbles = h < 4 ? bytes & 15 : bytes >> 4;
    return __builtin_convertvector(nibbles, vec8);
}
#endif

#if !defined(__AVX512F__)
#define widen_nibbles(k_row, v) broadcast(0.0f) /* unused without AVX-512 */
#endif
/* int4 tiles: int8.h's block tiles over nibble rows, with minima. */
DEFINE_BLOCK_TILES(i4, uint8_t, I4_BLOCK_BYTES, PANEL / 2, 1, widen_nibbles, widen8_nibbles)

/* Pack W [N, K] (row-major fp32; K a multiple of 32) into 4-bit blocks: per column and
 * block, minimum = smallest w, scale = (largest - smallest) / 15, q = (w - minimum) /
 * scale rounded to nearest even, in [0, 15] (q = 0 where scale is 0); zero columns past N. */
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
                    uint8_t *byte = block + kk * PANEL / 2 + c % (PANEL / 2);
                    *byte |= (uint8_t)q << (c < PANEL / 2 ? 0 : 4);
                }
            }
            memcpy(block + I8_BLOCK * PANEL / 2, scales, sizeof scales);
        }
}
