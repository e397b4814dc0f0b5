/* Part of kernels.c's one translation unit (after vector.h). */
#pragma once
#include "vector.h"

/* ---------------------------------------------------------------------------------
 * Paged attention. Item = (tile, KV head): a tile is up to 4 consecutive tokens of one
 * sequence (a prefill chunk) or a single token (a decode); that KV head's query heads
 * (GQA) attend over each token's first num_keys cached keys, read in place from the
 * blocks its table lists. A prefill tile's query heads go one after another; a decode
 * token's go together, as the rows of one tile, so its keys and values are read once.
 * Sharing a tile only shares memory traffic: every query's arithmetic is the same as if
 * it were computed alone. While a thread computes an item it prefetches the next one.
 */

/* probs[0:L] = softmax(scores[0:L]), in place. scores must have room for L rounded up
 * to 16 (the tail is computed as a whole vector). The sum runs in 16 lanes (lane l adds
 * keys l, l + 16, ... in order) and then sum_lanes: a fixed order for a given L. */
static void softmax(float *scores, long L) {
    long padded = (L + LANES - 1) / LANES * LANES;
    for (long j = L; j < padded; j++) scores[j] = -INFINITY; /* exp gives 0: adds nothing */
    vecf top = load(scores);
    for (long j = LANES; j < padded; j += LANES) {
        vecf x = load(scores + j);
        top = blend(x > top, x, top);
    }
    float max = top[0];
    for (int l = 1; l < LANES; l++) max = top[l] > max ? top[l] : max; /* exact in any order */
    vecf total = broadcast(0.0f);
    for (long j = 0; j < padded; j += LANES) {
        vecf e = exp_upto_88(load(scores + j) - max);
        store(scores + j, e);
        total = total + e;
    }
    vecf inverse = broadcast(1.0f / sum_lanes(total));
    for (long j = 0; j < padded; j += LANES) store(scores + j, load(scores + j) * inverse);
}

typedef struct {
    const float *query;       /* [N, q_stride]: heads of head_dim at the row's start */
    long q_stride;
    const float *keys;        /* [kv_heads, num_blocks, block_size, head_dim] */
    const float *values;
    long num_blocks, block_size;
    const int32_t *tables;    /* [S, table_stride] block ids */
    long table_stride;
    const int32_t *token_seq; /* [N] which table */
    const int32_t *num_keys;  /* [N] keys visible to the token (its position + 1) */
    float *out;               /* [N, num_heads * head_dim] */
    long num_heads, num_kv_heads, head_dim;
    float scale;
    long window;              /* > 0: a token sees only its last `window` keys (Mistral) */
    float softcap;            /* > 0: scores become softcap * tanh(scores / softcap) (Gemma 2) */
} attention_args;

/* The first key a token with `num_keys` visible keys attends to: 0, or the window's start.
 * Keys before it get probability exactly 0 (their scores are set to -inf), so skipping
 * whole blocks of them before the first one needed changes no bits: every row's result
 * is the same whichever rows share its tile. */
static inline long first_key(const attention_args *a, long num_keys) {
    return a->window > 0 && num_keys > a->window ? num_keys - a->window : 0;
}

/* Rows computed together: each block of keys or values is read from memory once per
 * tile and from L1 by the tile's other rows. Row r of a tile sees L0 + r * step keys:
 * step 1 for consecutive tokens of one sequence, 0 for the query heads of one token.
 * Every row's arithmetic is exactly what it would be alone. */
#define TILE 4

/* The next item's blocks, prefetched while this item computes. One block after another,
 * a thread waits for memory at each block: scattered 4 KiB blocks come at ~21 GB/s to
 * two threads, where several streams at once get ~37 GB/s. So a thread claims its next
 * item before computing the current one, and at each block it computes prefetches a
 * share of the next item's lines, AHEAD_WAYS blocks in round-robin. The share is even:
 * prefetching all of it early was slower (the loads then wait behind the prefetches).
 * Decode attention, 32 sequences x 190 keys, every layer, scattered blocks: 16.8 ->
 * 12.2 ms (docs/performance.md). */
#define AHEAD_WAYS 8
#define AHEAD_MAX_BLOCKS 64 /* per K or V: 1024 keys at 16 a block; later ones on demand */

typedef struct {
    const char *blocks[2 * AHEAD_MAX_BLOCKS]; /* the next item's K blocks, then its V blocks */
    long num_blocks, lines_per_block;
    long lines_per_call;                      /* rows of up to AHEAD_WAYS lines per call */
    long group, line, ways;                   /* cursor: first block of group, line, width */
} prefetcher;

/* Prefetch the next lines_per_call rows of lines; a no-op once all are asked for. */
static inline void prefetch_some(prefetcher *p) {
    if (!p) return;
    for (long c = 0; c < p->lines_per_call && p->group < p->num_blocks; c++) {
        const char *const *blocks = p->blocks + p->group;
        long offset = p->line * 64;
        for (long j = 0; j < p->ways; j++) __builtin_prefetch(blocks[j] + offset, 0, 3);
        if (++p->line == p->lines_per_block) {
            p->line = 0;
            p->group += AHEAD_WAYS;
            long left = p->num_blocks - p->group;
            p->ways = left < AHEAD_WAYS ? left : AHEAD_WAYS;
        }
    }
}

/* scores[r][j] = q_r . k_j for j < L0 + r * step, block by block. queries: [count][D],
 * scaled. Prefetches a share of the next item at each block. */
static inline __attribute__((always_inline)) void score_tile(
    const float *queries, long count, long L0, long step, const float *k_head,
    const int32_t *table, long block_size, long D, float *scores, long stride,
    prefetcher *ahead, long first_block) {
    long block_elems = block_size * D, keys = L0 + (count - 1) * step;
    for (long b = first_block, start = b * block_size; start < keys; start += block_size, b++) {
        const float *block = k_head + table[b] * block_elems;
        prefetch_some(ahead);
        for (long r = 0; r < count; r++) {
            long seen = L0 + r * step - start;
            long n = seen < block_size ? seen : block_size;
            const float *q = queries + r * D;
            float *s = scores + r * stride + start;
            long i = 0;
            if (D % LANES == 0) /* 16 keys at a time, same bits as one at a time */
                for (; i + LANES <= n; i += LANES) {
                    vecf partials[LANES];
                    for (int k = 0; k < LANES; k++)
                        partials[k] = partial_dot(q, block + (i + k) * D, D);
                    store(s + i, sum_lanes_16(partials));
                }
            for (; i < n; i++) s[i] = dot(q, block + i * D, D);
        }
    }
}

/* out_r[0:D] = sum_j probs[r][j] v_j over j < L0 + r * step, each element summed in key
 * order, in registers, 64 columns at a time. Row r is written at out + r * out_stride.
 * Prefetches a share of the next item at each block of each 64 columns. */
static inline __attribute__((always_inline)) void weigh_tile(
    const float *probs, long stride, long count, long L0, long step, const float *v_head,
    const int32_t *table, long block_size, long D, float *out, long out_stride,
    prefetcher *ahead, long first_block) {
    long block_elems = block_size * D, keys = L0 + (count - 1) * step;
    if (D % LANES) { /* a head_dim not a multiple of 16: plain scalar sums */
        for (long r = 0; r < count; r++)
            for (long d = 0; d < D; d++) {
                float acc = 0.0f;
                for (long j = 0; j < L0 + r * step; j++)
                    acc += probs[r * stride + j] *
                           v_head[table[j / block_size] * block_elems + (j % block_size) * D + d];
                out[r * out_stride + d] = acc;
            }
        return;
    }
#if !defined(__AVX512F__)
    /* Without AVX-512, TILE x 4 accumulators of 64 bytes are 32 ymm registers of 16 (gcc
     * keeps them in memory): 16 columns at a time instead, TILE x 2 8-lane accumulators.
     * The same sums in the same order: the same bits. Prefetches on the first pass. */
    for (long d0 = 0; d0 < D; d0 += LANES) {
        vec8 acc[TILE][2];
        for (long r = 0; r < TILE; r++) acc[r][0] = acc[r][1] = (vec8){};
        for (long b = first_block, start = b * block_size; start < keys; start += block_size, b++) {
            const float *block = v_head + table[b] * block_elems + d0;
            if (d0 % (4 * LANES) == 0) prefetch_some(ahead); /* once per 64 columns */
            long n = keys - start < block_size ? keys - start : block_size;
            for (long i = 0; i < n; i++) {
                long j = start + i;
                vec8 low = *(const vec8 *)(block + i * D);
                vec8 high = *(const vec8 *)(block + i * D + LANES / 2);
                for (long r = 0; r < count; r++) {
                    if (j >= L0 + r * step) continue; /* beyond this row's keys */
                    vec8 p = (vec8){} + probs[r * stride + j]; /* as broadcast() makes it */
                    acc[r][0] = acc[r][0] + p * low;
                    acc[r][1] = acc[r][1] + p * high;
                }
            }
        }
        for (long r = 0; r < count; r++) memcpy(out + r * out_stride + d0, acc[r], sizeof acc[r]);
    }
#else
    for (long d0 = 0; d0 < D; d0 += 4 * LANES) {
        long nv = D - d0 < 4 * LANES ? (D - d0) / LANES : 4;
        vecf acc[TILE][4];
        for (long r = 0; r < TILE; r++)
            for (long c = 0; c < 4; c++) acc[r][c] = broadcast(0.0f);
        for (long b = first_block, start = b * block_size; start < keys; start += block_size, b++) {
            const float *block = v_head + table[b] * block_elems + d0;
            prefetch_some(ahead);
            long n = keys - start < block_size ? keys - start : block_size;
            for (long i = 0; i < n; i++) {
                long j = start + i;
                vecf v[4];
                for (long c = 0; c < nv; c++) v[c] = load(block + i * D + c * LANES);
                for (long r = 0; r < count; r++) {
                    if (j >= L0 + r * step) continue; /* beyond this row's keys */
                    vecf p = broadcast(probs[r * stride + j]);
                    for (long c = 0; c < nv; c++) acc[r][c] = acc[r][c] + p * v[c];
                }
            }
        }
        for (long r = 0; r < count; r++)
            for (long c = 0; c < nv; c++) store(out + r * out_stride + d0 + c * LANES, acc[r][c]);
    }
#endif
}

/* Gemma 2's soft-capping of scores[first:L], before the window hides the others; a
 * scalar tanh per score, the same for a row whichever rows share its tile. Then
 * scores[0:first] = -inf: keys outside the sliding window weigh exactly 0. */
static inline void cap_and_hide(const attention_args *a, float *scores, long first, long L) {
    if (a->softcap > 0)
        for (long j = first; j < L; j++) scores[j] = a->softcap * tanhf(scores[j] / a->softcap);
    for (long j = 0; j < first; j++) scores[j] = -INFINITY;
}

/* Whether a tile of `count` tokens computes its query heads as the rows of one tile. */
static inline int heads_as_rows(const attention_args *a, long count) {
    return count == 1 && a->num_heads / a->num_kv_heads <= TILE;
}

/* One (tile of tokens, KV head). A decode token: its group of query heads as one tile's
 * rows (one pass over the keys and values). Several tokens: the query heads one after
 * another (the head's keys and values stay in L1/L2 between them). scratch: TILE *
 * stride floats. */
static inline __attribute__((always_inline)) void attend_tile_d(
    const attention_args *a, long first, long count, long head, float *scratch, long stride,
    long D, prefetcher *ahead) {
    long group = a->num_heads / a->num_kv_heads, L0 = a->num_keys[first];
    long head_elems = a->num_blocks * a->block_size * D;
    const int32_t *table = a->tables + a->token_seq[first] * a->table_stride;
    const float *k_head = a->keys + head * head_elems, *v_head = a->values + head * head_elems;
    long first_block = first_key(a, L0) / a->block_size; /* the tile's first row sees most */
    if (heads_as_rows(a, count)) {
        const float *query = a->query + first * a->q_stride + head * group * D;
        float queries[TILE * D];
        for (long i = 0; i < group * D; i++) queries[i] = query[i] * a->scale;
        score_tile(queries, group, L0, 0, k_head, table, a->block_size, D, scratch, stride,
                   ahead, first_block);
        for (long g = 0; g < group; g++) {
            cap_and_hide(a, scratch + g * stride, first_key(a, L0), L0);
            softmax(scratch + g * stride, L0);
        }
        float *out = a->out + (first * a->num_heads + head * group) * D;
        weigh_tile(scratch, stride, group, L0, 0, v_head, table, a->block_size, D, out, D,
                   ahead, first_block);
        return;
    }
    for (long g = 0; g < group; g++) {
        long q_head = head * group + g;
        float queries[TILE * D];
        for (long r = 0; r < count; r++)
            for (long d = 0; d < D; d++)
                queries[r * D + d] = a->query[(first + r) * a->q_stride + q_head * D + d] * a->scale;
        score_tile(queries, count, L0, 1, k_head, table, a->block_size, D, scratch, stride,
                   ahead, first_block);
        for (long r = 0; r < count; r++) {
            cap_and_hide(a, scratch + r * stride, first_key(a, L0 + r), L0 + r);
            softmax(scratch + r * stride, L0 + r);
        }
        float *out = a->out + (first * a->num_heads + q_head) * D;
        weigh_tile(scratch, stride, count, L0, 1, v_head, table, a->block_size, D, out,
                   a->num_heads * D, ahead, first_block);
    }
}

/* The common head sizes and every tile height get their own copies, so the compiler
 * unrolls the row loops and keeps the value sums in registers. */
#define ATTEND_FOR_D(COUNT)                                                                \
    switch (a->head_dim) {                                                                 \
    case 64: attend_tile_d(a, first, COUNT, head, scratch, stride, 64, ahead); break;             \
    case 128: attend_tile_d(a, first, COUNT, head, scratch, stride, 128, ahead); break;           \
    default: attend_tile_d(a, first, COUNT, head, scratch, stride, a->head_dim, ahead); break;    \
    }

static void attend_tile(const attention_args *a, long first, long count, long head,
                        float *scratch, long stride, prefetcher *ahead) {
    switch (count) {
    case 1: ATTEND_FOR_D(1) break;
    case 2: ATTEND_FOR_D(2) break;
    case 3: ATTEND_FOR_D(3) break;
    default: ATTEND_FOR_D(TILE) break;
    }
}

/* Tiles: runs of up to TILE tokens of one sequence at consecutive positions. */
static long make_tiles(const int32_t *token_seq, const int32_t *num_keys, long num_tokens,
                       long *starts) {
    long tiles = 0;
    for (long t = 0; t < num_tokens;) {
        long n = 1;
        while (n < TILE && t + n < num_tokens && token_seq[t + n] == token_seq[t] &&
               num_keys[t + n] == num_keys[t] + n)
            n++;
        starts[tiles++] = t;
        t += n;
    }
    starts[tiles] = num_tokens;
    return tiles;
}

/* How many blocks tile `tile` reads: those of its last token's keys. */
static long tile_blocks(const attention_args *a, const long *starts, long tile) {
    return (a->num_keys[starts[tile + 1] - 1] + a->block_size - 1) / a->block_size;
}

/* Aim `p` at item `next`, its prefetches spread over the blocks item `item` computes. */
static void plan_prefetch(prefetcher *p, const attention_args *a, const long *starts,
                          long item, long next) {
    long tile = next / a->num_kv_heads, head = next % a->num_kv_heads;
    long block_elems = a->block_size * a->head_dim;
    long head_elems = a->num_blocks * block_elems;
    long first_block = first_key(a, a->num_keys[starts[tile]]) / a->block_size;
    const int32_t *table =
        a->tables + a->token_seq[starts[tile]] * a->table_stride + first_block;
    long n = tile_blocks(a, starts, tile) - first_block;
    n = n < AHEAD_MAX_BLOCKS ? n : AHEAD_MAX_BLOCKS;
    for (long b = 0; b < n; b++) {
        p->blocks[b] = (const char *)(a->keys + head * head_elems + table[b] * block_elems);
        p->blocks[n + b] = (const char *)(a->values + head * head_elems + table[b] * block_elems);
    }
    p->num_blocks = 2 * n;
    p->lines_per_block = (block_elems * (long)sizeof(float) + 63) / 64; /* at least 1 */
    p->group = p->line = 0;
    p->ways = p->num_blocks < AHEAD_WAYS ? p->num_blocks : AHEAD_WAYS;
    /* The calls item `item` makes: per pass, one per key block and one per value block
     * per 64 columns. */
    long this_tile = item / a->num_kv_heads;
    long count = starts[this_tile + 1] - starts[this_tile];
    long passes = heads_as_rows(a, count) ? 1 : a->num_heads / a->num_kv_heads;
    long calls = passes * tile_blocks(a, starts, this_tile) * (1 + (a->head_dim + 63) / 64);
    long rows = (p->num_blocks + AHEAD_WAYS - 1) / AHEAD_WAYS * p->lines_per_block;
    p->lines_per_call = (rows + calls - 1) / calls;
}

/* Every (tile, KV head) item of a step, shared among the threads of the enclosing
 * parallel region through `*claimed` (zero on entry; each thread takes its next item
 * when it starts one, so it knows what to prefetch); ends with a barrier. scratch:
 * this thread's TILE * stride floats. Which thread computes an item changes no bits. */
static void attention_items(const attention_args *a, const long *starts, long tiles,
                            float *scratch, long stride, long *claimed) {
    long items = tiles * a->num_kv_heads;
    long item = __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED);
    while (item < items) {
        long next = __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED);
        prefetcher ahead;
        if (next < items) plan_prefetch(&ahead, a, starts, item, next);
        long tile = item / a->num_kv_heads, first = starts[tile];
        attend_tile(a, first, starts[tile + 1] - first, item % a->num_kv_heads, scratch, stride,
                    next < items ? &ahead : NULL);
        item = next;
    }
#pragma omp barrier
}

/* The score row length every query fits in: the most keys, rounded up to whole vectors. */
static long score_stride(const int32_t *num_keys, long num_tokens) {
    long max_keys = 1;
    for (long t = 0; t < num_tokens; t++) max_keys = num_keys[t] > max_keys ? num_keys[t] : max_keys;
    return (max_keys + LANES - 1) / LANES * LANES;
}

/* window > 0: each token attends to its last `window` keys only (sliding window);
 * softcap > 0: its scores are soft-capped first (Gemma 2). */
void lamina_paged_attention_windowed(const float *query, long q_stride, const float *keys,
                                     const float *values, long num_blocks, long block_size,
                                     const int32_t *tables, long table_stride,
                                     const int32_t *token_seq, const int32_t *num_keys,
                                     float *out, long num_tokens, long num_heads,
                                     long num_kv_heads, long head_dim, float scale,
                                     long window, float softcap) {
    attention_args a = {query,   q_stride,  keys,         values,   num_blocks,
                        block_size, tables, table_stride, token_seq, num_keys,
                        out,     num_heads, num_kv_heads, head_dim, scale, window, softcap};
    long stride = score_stride(num_keys, num_tokens);
    long *starts = malloc(sizeof(long) * (num_tokens + 1));
    long tiles = make_tiles(token_seq, num_keys, num_tokens, starts), claimed = 0;
#pragma omp parallel if (tiles * num_kv_heads > 1)
    {
        float *scratch = malloc(sizeof(float) * TILE * stride);
        attention_items(&a, starts, tiles, scratch, stride, &claimed);
        free(scratch);
    }
    free(starts);
}

void lamina_paged_attention(const float *query, long q_stride, const float *keys,
                            const float *values, long num_blocks, long block_size,
                            const int32_t *tables, long table_stride, const int32_t *token_seq,
                            const int32_t *num_keys, float *out, long num_tokens,
                            long num_heads, long num_kv_heads, long head_dim, float scale) {
    lamina_paged_attention_windowed(query, q_stride, keys, values, num_blocks, block_size,
                                    tables, table_stride, token_seq, num_keys, out, num_tokens,
                                    num_heads, num_kv_heads, head_dim, scale, 0, 0.0f);
}
