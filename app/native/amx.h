/* Part of kernels.c's one translation unit (after int8.h and int4.h): Intel AMX tiles for
 * the int8 and 4-bit matmuls' dot products, 16 rows at a time.
 *
 * A tile register holds up to 16 rows of 64 bytes. TDPBSUD multiplies a tile of signed
 * bytes, 16 rows x 32 (16 rows' quantized block of 32 k: the i8_act blocks in place, a
 * row's blocks 40 bytes apart) by a tile of unsigned bytes, 8 x 64 (a block's 8 quads
 * of 16 columns x 4 k), into 16 x 16 int32 sums, exact: per row and column the sum of
 * xq * w over the block, with w the packed q + 128 of int8 (so the sum is the VNNI
 * path's dot plus 128 * sum(xq), subtracted here as it is there) or a nibble of int4
 * (unpacked to bytes first). Then each element takes the fp32 steps of int8.h and int4.h,
 * the same expressions in the same order, block after block: integer sums are exact, so
 * a 16-row AMX tile gives every row the bits the 6-row VNNI tiles give it, and a matmul
 * may mix them (rows past the last whole 16 take the VNNI tiles) without a row's bits
 * ever depending on the row count.
 *
 * Compiled where the compiler targets AMX-INT8 (the -march=native build on a CPU that
 * has it); the portable builds have none of it. Linux hands out AMX's tile state only on
 * request (arch_prctl ARCH_REQ_XCOMP_PERM, once per process, at load): refused (a kernel
 * before 5.16, a hypervisor that hides it), every matmul stays on VNNI and
 * lamina_amx_status() says why. Each call loads its tile configuration and releases the
 * tiles at its end: torch's oneDNN may configure tiles differently on the same threads.
 */
#pragma once
#include "bf16.h"
#include "int4.h"
#include "int8.h"

/* gcc spells the targets __AMX_TILE__ and __AMX_INT8__, clang __AMXTILE__ and __AMXINT8__. */
#if (defined(__AMX_TILE__) || defined(__AMXTILE__)) && \
    (defined(__AMX_INT8__) || defined(__AMXINT8__)) && QUANT_WIDE && defined(__linux__)
#define AMX_TILES 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define AMX_TILES 0
#endif

#define AMX_ROWS 16 /* rows per AMX tile: a tile register's 16 rows */

/* What the fp32 steps of the AMX tiles need of each quantized row, once more, block by
 * block: row r's values of block b at b * stride + r (stride: the matmul's rows), so 16
 * consecutive rows' values of a block, from any row, are 64 contiguous bytes. Written as
 * the rows are quantized (amx_quantize_rows), once per matmul, for all its panels. */
typedef struct {
    float *scales;    /* xs */
    int32_t *offsets; /* int8: 128 * sum(xq), in TDPBSUD's sums as in VNNI's */
    float *sums;      /* 4-bit: (float)sum(xq) */
    long stride;
} amx_rows;

/* Where amx_rows lives in a matmul's scratch: after the M rows' quantized blocks (40 bytes
 * each of 32 k; the tables take 12 bytes per block and row more, within
 * rounded_rows_floats' 4 bytes per k). */
static inline amx_rows amx_rows_in(void *scratch, long M, long blocks) {
    long rows_bytes = (M * blocks * (long)sizeof(i8_act) + 63) / 64 * 64;
    float *tables = (float *)((char *)scratch + rows_bytes);
    return (amx_rows){tables, (int32_t *)(tables + blocks * M), tables + 2 * blocks * M, M};
}

/* The same tables from row `row` on. */
static inline amx_rows amx_rows_from(amx_rows rows, long row) {
    return (amx_rows){rows.scales + row, rows.offsets + row, rows.sums + row, rows.stride};
}

/* quantize_rows_i8 (shared among the threads of the enclosing parallel region, ending
 * with the loop's barrier), and each row's amx_rows values beside (amx_rows_in). Once per
 * matmul: gathered per work item (a panel's rows) instead, as they were, the AMX int8 and
 * 4-bit matmuls took 1.12-1.27x the time (single matmuls of the default model's shapes). */
static void amx_quantize_rows(const float *x, long ldx, long M, long K, void *scratch) {
    long blocks = K / I8_BLOCK;
    i8_act *out = scratch;
    amx_rows tables = amx_rows_in(scratch, M, blocks);
#pragma omp for schedule(static)
    for (long r = 0; r < M; r++)
        for (long b = 0; b < blocks; b++) {
            i8_act *a = out + r * blocks + b;
            quantize_block_i8(x + r * ldx + b * I8_BLOCK, a);
            tables.scales[b * M + r] = a->scale;
            tables.offsets[b * M + r] = 128 * a->sum;
            tables.sums[b * M + r] = (float)a->sum;
        }
}

/* lamina_amx_status(): whether the quantized matmuls use AMX tiles. */
enum { AMX_NOT_BUILT = 0, AMX_REFUSED = 1, AMX_TURNED_OFF = 2, AMX_IN_USE = 3 };

#if AMX_TILES
static int amx_permitted, amx_wanted = 1;

/* Ask Linux for the tile data state, once per process (the permission covers every
 * thread), as the library loads. */
__attribute__((constructor)) static void request_amx(void) {
    const long request_permission = 0x1023, tile_data = 18; /* ARCH_REQ_XCOMP_PERM, XTILEDATA */
    amx_permitted = syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
}

static inline int amx_in_use(void) { return amx_permitted && amx_wanted; }

/* LDTILECFG's 64 bytes: palette 1, then bytes per row and rows of each tile register. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_config;

/* Two sets of tiles, so the products of one block run while the vector units take the
 * previous block's fp32 steps: set 0 in tmm0 (the int32 sums: 16 rows x 16 columns),
 * tmm1 (16 rows' block of activations: 32 bytes each), tmm2 (a unit's 8 quads of
 * weights: 8 x 64 bytes); set 1 in tmm3-5. */
static void amx_configure(void) {
    amx_config config = {.palette = 1};
    for (int set = 0; set < 2; set++) {
        config.rows[3 * set] = AMX_ROWS, config.bytes_per_row[3 * set] = 4 * LANES;
        config.rows[3 * set + 1] = AMX_ROWS, config.bytes_per_row[3 * set + 1] = I8_BLOCK;
        config.rows[3 * set + 2] = I8_QUADS, config.bytes_per_row[3 * set + 2] = 4 * LANES;
    }
    /* Not _tile_loadconfig: gcc 12's names one byte of the operand, and the optimizer
     * then drops the stores to the others (seen: LDTILECFG faulted at -O3). */
    __asm__ volatile("ldtilecfg %0" ::"m"(config));
}

/* A block's exact int32 sums for 16 rows x 16 columns into sums, on tiles C, A, B (a
 * set: literal numbers, as the instructions name them): activations at x (16 rows'
 * block, `stride` bytes apart), weights at quads (8 quads x 16 columns x 4 bytes,
 * quad_stride bytes apart). gcc's _tile_loadd and _tile_stored do not tell the
 * compiler that they read or write memory, so compiler barriers keep the 4-bit path's
 * unpacked quads stored before the tile load (bf16's tail lost its stores without
 * one) and the sums read after the tile store. */
#define AMX_DOTS(C, A, B, x, stride, quads, quad_stride, sums)                             \
    do {                                                                                   \
        _tile_zero(C);                                                                     \
        __asm__ volatile("" ::: "memory");                                                 \
        _tile_loadd(A, x, stride);                                                         \
        _tile_loadd(B, quads, quad_stride);                                                \
        _tile_dpbsud(C, A, B);                                                             \
        _tile_stored(C, sums, 4 * LANES);                                                  \
        __asm__ volatile("" ::: "memory");                                                 \
    } while (0)

/* Block b's fp32 steps for 16 rows of one unit, int8.h's and int4.h's (the same
 * expressions, so the same contractions): int8 acc[r] += (float)(sums[r] - offset) *
 * (xs * scale); 4-bit acc[r] += (float)sums[r] * (xs * scale), then acc[r] += (float)
 * sum(xq) * (xs * minimum). xs and sum(xq) are broadcast from memory, where int8.h and
 * int4.h add them to zero: the same values (a scale is never -0, nor a converted sum). */
static inline __attribute__((always_inline)) void amx_steps(
    int nibbles, const int32_t sums[AMX_ROWS][LANES], amx_rows rows, long b,
    const float *scales, vecf acc[AMX_ROWS]) {
    const float *xs_of = rows.scales + b * rows.stride, *sum_of = rows.sums + b * rows.stride;
    const int32_t *offset_of = rows.offsets + b * rows.stride;
    vecf scale = load(scales), least = load(scales + PANEL); /* 4-bit: minima after scales */
#pragma GCC unroll 16 /* the accumulators stay in registers */
    for (int r = 0; r < AMX_ROWS; r++) {
        __m512i sum = _mm512_load_si512(sums[r]);
        vecf xs = (vecf)_mm512_set1_ps(xs_of[r]);
        if (!nibbles) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(offset_of[r]));
        acc[r] = acc[r] + int_to_float(sum) * (xs * scale);
        if (nibbles) acc[r] = acc[r] + (vecf)_mm512_set1_ps(sum_of[r]) * (xs * least);
    }
}

/* 4-bit: a unit's 4 pairs of quads (64 bytes each, 256 apart) -> its 8 quads as bytes
 * (the low nibbles of pair p are quad 2p, the high ones quad 2p + 1), 64 bytes apart. */
static inline void amx_unpack_nibbles(const uint8_t *pairs, uint8_t quads[I8_QUADS][4 * LANES]) {
    const __m512i low = _mm512_set1_epi8(15);
    for (int p = 0; p < I4_PAIRS; p++) {
        __m512i bytes = _mm512_loadu_si512(pairs + p * 4 * PANEL);
        _mm512_store_si512(quads[2 * p], _mm512_and_si512(bytes, low));
        _mm512_store_si512(quads[2 * p + 1], _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low));
    }
}

/* 4-bit: a whole panel's nibbles -> bytes, as int8's panel lays its weights out (blocks of
 * 8 quads x 64 columns x 4 bytes, I8_BLOCK * PANEL bytes each) into `quads`: once per
 * panel for all the 16-row tiles of a call, instead of once per tile. */
static void amx_unpack_panel(const uint8_t *w, long blocks, uint8_t *quads) {
    const __m512i low = _mm512_set1_epi8(15);
    for (long b = 0; b < blocks; b++)
        for (int p = 0; p < I4_PAIRS; p++)
            for (int i = 0; i < 4 * PANEL; i += 64) { /* the pair's 4 units */
                __m512i bytes = _mm512_loadu_si512(w + b * I4_BLOCK_BYTES + p * 4 * PANEL + i);
                uint8_t *even = quads + b * I8_BLOCK * PANEL + 2 * p * 4 * PANEL + i;
                _mm512_store_si512(even, _mm512_and_si512(bytes, low));
                _mm512_store_si512(even + 4 * PANEL,
                                   _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low));
            }
}

/* Block b's products for unit v on tile set SET (0: tmm0-2, 1: tmm3-5) into sums. */
#define AMX_BLOCK(SET, b, sums)                                                            \
    do {                                                                                   \
        const uint8_t *block = w + (b) * block_bytes + v * 4 * LANES;                      \
        const uint8_t *quads = block;                                                      \
        long quad_stride = 4 * PANEL;                                                      \
        if (nibbles && bytes) /* amx_unpack_panel's */                                     \
            quads = bytes + (b) * I8_BLOCK * PANEL + v * 4 * LANES;                        \
        else if (nibbles) {                                                                \
            amx_unpack_nibbles(block, unpacked[SET]);                                      \
            quads = unpacked[SET][0], quad_stride = 4 * LANES;                             \
        }                                                                                  \
        if (SET)                                                                           \
            AMX_DOTS(3, 4, 5, x + (b), stride, quads, quad_stride, sums);                  \
        else                                                                               \
            AMX_DOTS(0, 1, 2, x + (b), stride, quads, quad_stride, sums);                  \
    } while (0)

/* A tile of 16 rows x nv units of 16 columns over `blocks` blocks of int8 weights, or of
 * 4-bit ones (nibbles): tile_i8_ROWS_4's or tile_i4_ROWS_4's work and bits. A unit at a
 * time, its 16 fp32 sums in registers: x the rows' quantized blocks (row stride ldx
 * blocks), rows their scales and sums (amx_rows, from x's first row), w the panel (4-bit:
 * its nibbles as bytes in `bytes` where amx_unpack_panel made them, else unpacked here
 * block by block); the sums in out; with `ahead`, the next panel prefetched meanwhile (a quarter per unit).
 * The tiles take block b + 1 (on the other set) before the vector units take block b's
 * steps.
 * Slower on the Xeon (Sapphire Rapids class) this was measured on: a block of all 4 units
 * at a time (their 64 sums in memory, the activations' tile loaded once per block), the
 * sums starting from the offsets (a tile load) instead of zero, the activations copied
 * to a contiguous tile first, a software prefetch of the weights. The tiles and the
 * vector units did not run in parallel there: their times add. */
static inline __attribute__((always_inline)) void amx_tile(
    int nibbles, const i8_act *x, long ldx, amx_rows rows, const uint8_t *w,
    const uint8_t *bytes, long blocks, int nv, vecf out[AMX_ROWS][4], const char *ahead) {
    int32_t sums[2][AMX_ROWS][LANES] __attribute__((aligned(64)));
    uint8_t unpacked[2][I8_QUADS][4 * LANES] __attribute__((aligned(64))); /* 4-bit */
    const long block_bytes = nibbles ? I4_BLOCK_BYTES : I8_BLOCK_BYTES;
    const int block_lines = nibbles ? I4_BLOCK_LINES : I8_BLOCK_LINES;
    const long stride = ldx * (long)sizeof(i8_act), scale_step = block_bytes / sizeof(float);
    for (int v = 0; v < nv; v++) {
        const float *scales = (const float *)(w + (nibbles ? I8_BLOCK * PANEL / 2 : I8_BLOCK * PANEL));
        scales += v * LANES;
        vecf acc[AMX_ROWS];
        for (int r = 0; r < AMX_ROWS; r++) acc[r] = broadcast(0.0f);
        AMX_BLOCK(0, 0, sums[0]);
        for (long b = 0; b < blocks; b += 2) { /* block b on set 0, b + 1 on set 1 */
            long next = b + 1;
            for (int j = 2 * v; ahead && j < 2 * v + 2; j++)
                prefetch_quad_step(ahead + b * block_bytes, j, block_lines);
            if (next < blocks) AMX_BLOCK(1, next, sums[1]);
            amx_steps(nibbles, sums[0], rows, b, scales + b * scale_step, acc);
            if (next == blocks) break;
            for (int j = 2 * v; ahead && j < 2 * v + 2; j++)
                prefetch_quad_step(ahead + next * block_bytes, j, block_lines);
            if (next + 1 < blocks) AMX_BLOCK(0, next + 1, sums[0]);
            amx_steps(nibbles, sums[1], rows, next, scales + next * scale_step, acc);
        }
        for (int r = 0; r < AMX_ROWS; r++) out[r][v] = acc[r];
    }
}
static void amx_tile_i8(const i8_act *x, long ldx, amx_rows rows, const uint8_t *w, long blocks,
                        int nv, vecf out[AMX_ROWS][4], const char *ahead) {
    amx_tile(0, x, ldx, rows, w, 0, blocks, nv, out, ahead);
}
static void amx_tile_i4(const i8_act *x, long ldx, amx_rows rows, const uint8_t *w,
                        const uint8_t *bytes, long blocks, int nv, vecf out[AMX_ROWS][4],
                        const char *ahead) {
    amx_tile(1, x, ldx, rows, w, bytes, blocks, nv, out, ahead);
}

/* bf16 weights on AMX-BF16 (with VDPBF16PS's K-pair layout, which is TDPBF16PS's too):
 * every row of a bf16 matmul, 16 at a time, whatever the row count. TDPBF16PS does not
 * give VDPBF16PS's bits (docs/performance.md, "AMX tiles"), so no row may take the other
 * instruction: a row's sums are its own 16-pair chunks in k order, accumulated in the C
 * tile from zero, the same operations alone or among others (a tile's rows never touch
 * each other). Its bits differ from those of a CPU without AMX-BF16. */
#if (defined(__AMX_BF16__) || defined(__AMXBF16__)) && BF16_DOT
#define AMX_BF16 1
#define BF16_CHUNK_PAIRS (BF16_CHUNK_VALUES / 2) /* K-pairs per TDPBF16PS: 64 bytes a row */

/* tmm0-3: 16 rows x 16 fp32 sums, one per unit of the panel; tmm4: 16 rows' chunk of
 * activations; tmm5-7: a unit's chunk of weights, 16 K-pairs x 16 columns. 64 bytes a
 * row each. */
static void amx_configure_bf16(void) {
    amx_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.rows[t] = AMX_ROWS, config.bytes_per_row[t] = 4 * LANES;
    __asm__ volatile("ldtilecfg %0" ::"m"(config)); /* not _tile_loadconfig: see above */
}

/* One chunk of 16 K-pairs: the activations (x: 16 rows ldx values apart) into tmm4, then
 * the 4 units' weights (wc: the chunk's first pair of the panel, 2 * PANEL values a pair)
 * each into a B tile and onto its C tile. */
static inline __attribute__((always_inline)) void amx_chunk_bf16(const bf16_act *x, long ldx,
                                                                 const uint16_t *wc) {
    const long pair_bytes = 2 * PANEL * sizeof(uint16_t), unit = 2 * LANES; /* values */
    _tile_loadd(4, x, ldx * (long)sizeof(bf16_act));
    _tile_loadd(5, wc, pair_bytes);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, wc + unit, pair_bytes);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, wc + 2 * unit, pair_bytes);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, wc + 3 * unit, pair_bytes);
    _tile_dpbf16ps(3, 4, 5);
}

/* 16 rows x a whole panel (4 units: the panels are zero past N) over `pairs` K-pairs:
 * x the rounded rows (ldx values apart, zeros past K to a whole chunk: bf16_row_width),
 * w the panel; the fp32 sums in out. A last chunk of fewer than 16 pairs takes its
 * weights from a zeroed copy (the panel ends there): its products past K are 0 x 0. */
static void amx_tile_bf16(const bf16_act *x, long ldx, const uint16_t *w, long pairs,
                          vecf out[AMX_ROWS][4]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    long whole = pairs / BF16_CHUNK_PAIRS * BF16_CHUNK_PAIRS;
    for (long k = 0; k < whole; k += BF16_CHUNK_PAIRS)
        amx_chunk_bf16(x + 2 * k, ldx, w + k * 2 * PANEL);
    if (whole < pairs) {
        uint16_t tail[BF16_CHUNK_PAIRS][2 * PANEL] __attribute__((aligned(64))) = {{0}};
        memcpy(tail, w + whole * 2 * PANEL, (pairs - whole) * sizeof tail[0]);
        /* gcc's _tile_loadd does not tell the compiler it reads memory: without this the
         * stores to tail were dropped (seen: NaN sums) */
        __asm__ volatile("" ::: "memory");
        amx_chunk_bf16(x + 2 * whole, ldx, tail[0]);
    }
    const long row_bytes = 4 * sizeof(vecf); /* out's rows: a unit's 16 sums after another */
    _tile_stored(0, (char *)out, row_bytes);
    _tile_stored(1, (char *)out + sizeof(vecf), row_bytes);
    _tile_stored(2, (char *)out + 2 * sizeof(vecf), row_bytes);
    _tile_stored(3, (char *)out + 3 * sizeof(vecf), row_bytes);
}
#else
#define AMX_BF16 0
#endif
#else
#define AMX_BF16 0
static inline int amx_in_use(void) { return 0; }
#endif

/* AMX_NOT_BUILT, AMX_REFUSED (by the OS), AMX_TURNED_OFF (lamina_use_amx) or AMX_IN_USE. */
int32_t lamina_amx_status(void) {
#if AMX_TILES
    return !amx_permitted ? AMX_REFUSED : amx_wanted ? AMX_IN_USE : AMX_TURNED_OFF;
#else
    return AMX_NOT_BUILT;
#endif
}

/* Whether bf16 matmuls take AMX tiles (TDPBF16PS, every row) while AMX is in use. */
int32_t lamina_amx_bf16(void) { return AMX_BF16; }

/* Turn AMX tiles off (0) or back on (1, where built and permitted): the tests compare a
 * library's bits with and without them. Not while a matmul runs. */
void lamina_use_amx(int32_t on) {
#if AMX_TILES
    amx_wanted = on != 0;
#else
    (void)on;
#endif
}
