/* Vector types, loads and the reductions and exp every kernel shares. Part of the one
 * translation unit kernels.c includes (a unity build: the compiler sees and inlines
 * across every part); not a standalone header. */
#pragma once
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
/* Half a vecf: without AVX-512 (AVX2's 16 ymm registers) a vecf is two registers, and
 * gcc keeps 64-byte vectors it cannot hold in one register in memory; the hot loops
 * (the matmul tile, the FMA peak) use vec8 there. */
typedef float vec8 __attribute__((vector_size(32), aligned(4)));

static inline vecf broadcast(float a) { return (vecf){} + a; }
static inline vecf load(const float *p) { return *(const vecf *)p; }
static inline void store(float *p, vecf v) { *(vecf *)p = v; }
/* mask ? a : b, lane by lane (mask lanes are all ones or zero, as comparisons give). */
static inline vecf blend(veci mask, vecf a, vecf b) {
    return (vecf)(((veci)a & mask) | ((veci)b & ~mask));
}

/* Lane shuffles use __builtin_shufflevector (GCC >= 12 and clang; GCC's older
 * __builtin_shuffle is unknown to clang): index i < 16 picks lane i of the first vector,
 * 16 + i lane i of the second. The index lists are macros so both compilers see constants. */
#define HALF_HIGH 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15
#define QUARTER_HIGH 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7
#define EIGHTH_HIGH 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3
#define SIXTEENTH_HIGH 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1

/* Horizontal sum in a fixed order: lane i += lane i + 8, then + 4, + 2, + 1. */
static inline float sum_lanes(vecf v) {
    v = v + __builtin_shufflevector(v, v, HALF_HIGH);
    v = v + __builtin_shufflevector(v, v, QUARTER_HIGH);
    v = v + __builtin_shufflevector(v, v, EIGHTH_HIGH);
    v = v + __builtin_shufflevector(v, v, SIXTEENTH_HIGH);
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

/* Lanes of two vectors a, b: LO_w takes the low w lanes of each 2w-lane group of a, then
 * of b; HI_w the high ones. */
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO4 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define LO2 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define HI2 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define LO1 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define HI1 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
/* sum_lanes of 16 vectors at once: lane i of the result is sum_lanes(p[i]), bit for bit
 * (each step adds lane l and lane l + width of one key, as sum_lanes does), at 15 adds
 * instead of 64 shuffles and adds. */
static inline vecf sum_lanes_16(vecf p[16]) {
    vecf q[8], r[4], t[2];
    for (int k = 0; k < 8; k++) /* keys 2k, 2k+1: 8 lanes each */
        q[k] = __builtin_shufflevector(p[2 * k], p[2 * k + 1], LO8) +
               __builtin_shufflevector(p[2 * k], p[2 * k + 1], HI8);
    for (int k = 0; k < 4; k++) /* keys 4k..4k+3: 4 lanes each */
        r[k] = __builtin_shufflevector(q[2 * k], q[2 * k + 1], LO4) +
               __builtin_shufflevector(q[2 * k], q[2 * k + 1], HI4);
    for (int k = 0; k < 2; k++) /* keys 8k..8k+7: 2 lanes each */
        t[k] = __builtin_shufflevector(r[2 * k], r[2 * k + 1], LO2) +
               __builtin_shufflevector(r[2 * k], r[2 * k + 1], HI2);
    return __builtin_shufflevector(t[0], t[1], LO1) + __builtin_shufflevector(t[0], t[1], HI1);
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
