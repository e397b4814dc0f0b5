/*
 * Does AMX's TDPBF16PS give the bits of AVX512-BF16's VDPBF16PS, which lamina's bf16
 * matmul uses (bf16.h: per K-pair, the odd k's product then the even k's, each an FMA,
 * the pairs in k order)? Only then could bf16 tiles take some rows and VDPBF16PS the
 * others without a row's bits depending on its batch (docs/performance.md, "AMX tiles").
 *
 * For 1, 2 and 16 K-pairs per TDPBF16PS (a 16 x 16 fp32 tile, random start values),
 * random bf16 inputs with exponents near 1 ("normal") or spread down to products near
 * the denormal range ("wide"), it counts the elements whose bits differ from VDPBF16PS
 * over the same pairs in order, and, at one pair per instruction, from three candidate
 * roundings: even-first FMAs, the exact sum rounded once, and the pair's sum rounded
 * first, then added.
 *
 * Needs an AMX-BF16 CPU and Linux: gcc -O2 -march=native tests/perf/amx_bf16_probe.c -lm
 *   -o /tmp/amx_bf16_probe && /tmp/amx_bf16_probe
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static uint64_t state = 88172645463325252ull;
static uint32_t next_random(void) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (uint32_t)(state >> 11);
}
static uint16_t random_bf16(int wide) {
    uint32_t r = next_random();
    int exponent = wide ? 1 + (int)((r >> 8) % 100) : 123 + (int)((r >> 8) % 8);
    return (uint16_t)(((r & 1) << 15) | (exponent << 7) | ((r >> 1) & 0x7f));
}
static float widen(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}
static int same(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* 16 x 16 outputs over `pairs` K-pairs, `trials` times: counts of differing elements. */
static void probe(int pairs, int wide, int trials) {
    tile_config config = {.palette = 1};
    config.rows[0] = 16, config.bytes_per_row[0] = 64;         /* C: 16 x 16 fp32 */
    config.rows[1] = 16, config.bytes_per_row[1] = 4 * pairs;  /* A: 16 rows of pairs */
    config.rows[2] = pairs, config.bytes_per_row[2] = 64;      /* B: pairs x 16 columns */
    __asm__ volatile("ldtilecfg %0" ::"m"(config));
    static uint16_t a[16][32], b[16][32];
    static float start[16][16], tiled[16][16];
    long total = 0, vdp = 0, even_first = 0, once = 0, pair_first = 0;
    for (int t = 0; t < trials; t++) {
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 32; j++) a[i][j] = random_bf16(wide), b[i][j] = random_bf16(wide);
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 16; j++) start[i][j] = widen(random_bf16(wide)) * 1.37f;
        _tile_loadd(0, start, 64);
        _tile_loadd(1, a, 64);
        _tile_loadd(2, b, 64);
        _tile_dpbf16ps(0, 1, 2);
        _tile_stored(0, tiled, 64);
        for (int m = 0; m < 16; m++) {
            __m512 acc = _mm512_loadu_ps(start[m]);
            for (int p = 0; p < pairs; p++) {
                uint32_t pair;
                memcpy(&pair, &a[m][2 * p], sizeof pair);
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)pair),
                                       (__m512bh)_mm512_loadu_si512(b[p]));
            }
            float reference[16];
            _mm512_storeu_ps(reference, acc);
            for (int n = 0; n < 16; n++, total++) {
                vdp += !same(reference[n], tiled[m][n]);
                if (pairs != 1) continue;
                float x0 = widen(a[m][0]), x1 = widen(a[m][1]);
                float w0 = widen(b[0][2 * n]), w1 = widen(b[0][2 * n + 1]);
                double c = start[m][n], p0 = (double)x0 * w0, p1 = (double)x1 * w1;
                even_first += !same(fmaf(x1, w1, fmaf(x0, w0, start[m][n])), tiled[m][n]);
                once += !same((float)(c + p0 + p1), tiled[m][n]);
                pair_first += !same((float)((double)(float)(p0 + p1) + c), tiled[m][n]);
            }
        }
    }
    _tile_release();
    printf("%2d pairs per instruction, %s inputs: %ld elements, %ld differ from VDPBF16PS",
           pairs, wide ? "wide" : "normal", total, vdp);
    if (pairs == 1)
        printf("; %ld from even-first FMAs, %ld from one rounding, %ld from the pair summed "
               "first",
               even_first, once, pair_first);
    printf("\n");
}

int main(void) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) {
        perror("arch_prctl: no AMX tile state");
        return 1;
    }
    const int pairs[] = {1, 2, 16};
    for (int wide = 0; wide < 2; wide++)
        for (int i = 0; i < 3; i++) probe(pairs[i], wide, 2000);
    return 0;
}
