/*
 * lamina's native CPU kernels (fp32 activations): a matmul against panel-packed weights
 * (fp32, fp16, bf16, or block-quantized int8 and 4-bit), paged attention that reads the KV blocks in place, and a whole
 * stack of LLaMA decoder layers built from them (one call and one parallel region per
 * step).
 *
 * Both are batch invariant by construction: every output element is computed by the
 * same sequence of floating-point operations whatever the number of rows, the other
 * rows, the thread count or how work is split. In the matmul each element accumulates
 * its K products one after another, starting from zero (no split of K, no tree; with
 * bf16 weights, K-pairs in order: bf16.h; with int8 and 4-bit weights, exact integer
 * sums per block of 32, the blocks in order: int8.h), and only columns and blocks of
 * rows are shared between threads; in attention each query is computed on its own over exactly
 * its visible keys, in key order. So a token gets the
 * same bits alone or among 31 other requests, in a prefill chunk or a decode step,
 * with no padding.
 *
 * Compiled on the machine that runs it (app/native/build.py): -O3 -march=native
 * -fopenmp -ffp-contract=fast. OpenMP resolves to the libgomp torch already loaded, so
 * these kernels share torch's worker threads instead of starting a second pool.
 * Measured design choices, and what did not help: docs/performance.md, "Native kernels".
 *
 * One translation unit in parts, so the compiler still inlines across them:
 *   vector.h        vector types, loads, fixed-order sums, exp
 *   bf16.h          bf16 rounding, K-pair tiles (AVX512-BF16 or widened), packing
 *   int8.h          int8 blocks with per-column scales, rows quantized per block: int8
 *                   dot products (AVX512-VNNI, vpmaddubsw, plain C), quantizing packer
 *   int4.h          4-bit blocks with scales and minima (Q4_1's scheme): the same
 *   amx.h           AMX tiles for their dot products, 16 rows at a time, same bits;
 *                   bf16 matmuls on AMX (every row, its own bits) where in use
 *   matmul.h        the panel matmul, weight packing, the FMA peak
 *   attention.h     paged attention, with the next item prefetched
 *   decoder_stack.h a step's decoder layers in one parallel region
 *   argmax.h        greedy sampling's argmax over rows
 * app/native/build.py compiles this file; its cache key covers every part.
 */
#include "vector.h"
#include "bf16.h"
#include "int8.h"
#include "int4.h"
#include "amx.h"
#include "matmul.h"
#include "attention.h"
#include "decoder_stack.h"
#include "argmax.h"
