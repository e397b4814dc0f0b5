/* Part of kernels.c's one translation unit (after vector.h). */
#pragma once
#include "vector.h"

/* ---------------------------------------------------------------------------------
 * Greedy sampling's argmax: out[r] = the index of the first largest of row r's N values,
 * as torch.argmax gives it, rows shared among the threads. torch's runs on one thread:
 * 32 rows of a 49152-token vocabulary took ~0.7 ms of a 32-sequence step. Rows must
 * hold no NaN (the sampler rejects those before it gets here).
 */

/* Lane l tracks the largest of the values at l, l + 16, ... and where it first came;
 * the lanes then meet: the largest value, at its smallest index. */
static long argmax_row(const float *row, long N) {
    long best_at = 0;
    float best = row[0];
    long j = 0;
    if (N >= LANES) {
        vecf top = load(row);
        veci where = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, here = where;
        for (j = LANES; j + LANES <= N; j += LANES) {
            vecf x = load(row + j);
            here = here + LANES;
            veci larger = x > top; /* strictly: a lane keeps its first occurrence */
            top = blend(larger, x, top);
            where = (larger & here) | (~larger & where);
        }
        best = top[0], best_at = where[0];
        for (int l = 1; l < LANES; l++)
            if (top[l] > best || (top[l] == best && where[l] < best_at))
                best = top[l], best_at = where[l];
    }
    for (; j < N; j++) /* the tail, after every vector index: only a larger value wins */
        if (row[j] > best) best = row[j], best_at = j;
    return best_at;
}

void lamina_argmax_rows(const float *x, long ldx, long M, long N, int64_t *out) {
#pragma omp parallel for schedule(static) if (M > 1 && M * N >= (1L << 16))
    for (long r = 0; r < M; r++) out[r] = argmax_row(x + r * ldx, N);
}
