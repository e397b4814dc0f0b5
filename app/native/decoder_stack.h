/* Part of kernels.c's one translation unit (after matmul.h and attention.h). */
#pragma once
#include "attention.h"
#include "matmul.h"

/* ---------------------------------------------------------------------------------
 * A whole stack of decoder layers in one call: one parallel region for every layer of a
 * step, so the threads meet at a barrier between phases instead of being woken for each
 * of ~150 separate kernels, and the row-wise work between the matmuls (norms, rotary
 * embedding, KV store, the gated activation, residual adds) costs no torch dispatch.
 * Every phase works on each row (or each query, for attention) on its own, so batch
 * invariance holds as in the kernels above.
 *
 * LLaMA's layer: x += o(attention(norm(x))); x += down(act(gate) * up(norm'(x))).
 * Gemma's ("sandwich" norms, post_feedforward_norm set): each sublayer's output is
 * normalized before the residual add, and the MLP's input has a norm of its own:
 * x += norm2(o(...)); x += norm4(down(act(gate) * up(norm3(x)))).
 */

typedef struct {
    const float *input_norm, *post_attention_norm; /* [hidden] */
    linear_desc qkv, o, gate_up, down;            /* qkv: q, k, v heads; gate_up: gate, up */
    float *keys, *values;                          /* [kv_heads, num_blocks, block_size, dim] */
    const float *q_norm, *k_norm; /* [head_dim] per-head RMSNorm before rotary (Qwen3), or NULL */
    const float *pre_feedforward_norm, *post_feedforward_norm; /* [hidden] Gemma's, or NULL */
    long window;    /* > 0: this layer's tokens see their last `window` keys only */
    int local_rope; /* rotate with the step's local tables (Gemma 3's local layers) */
} layer_desc;

enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

typedef struct {
    long num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    long num_blocks, block_size; /* of the KV cache, scratch block included */
    float eps, scale;
    const layer_desc *layers;
    int activation;  /* ACT_SILU (SwiGLU) or ACT_GELU_TANH (GeGLU) */
    float softcap;   /* > 0: attention scores soft-capped (Gemma 2) */
} stack_desc;

typedef struct {
    float *x;                 /* [N, hidden]: the residual stream, updated in place */
    long num_tokens;
    long split;               /* rows [0, split) are prompt tokens (first weight copy) */
    const float *cos, *sin;   /* [N, head_dim]: each token's rotary row; sin carries the sign */
    const float *local_cos, *local_sin; /* the same for local_rope layers (else = cos, sin) */
    const int64_t *slots;     /* [N]: cache slot (block * block_size + offset) per token */
    const int32_t *tables;    /* attention: as lamina_paged_attention takes them */
    long table_stride;
    const int32_t *token_seq, *num_keys;
    float *work;              /* N * (hidden + q + 2 kv + q + 3 intermediate) floats */
} step_desc;

/* 1 / rms(row[0:H]) with eps: sum of squares in 16 lanes (in order), then sum_lanes, then
 * the tail; every RMSNorm of the stack sums this way, so a row's bits never depend on
 * which norm ran it. */
static float inverse_rms(const float *row, long H, float eps) {
    vecf squares = broadcast(0.0f);
    long d = 0;
    for (; d + LANES <= H; d += LANES) squares = squares + load(row + d) * load(row + d);
    float sum = sum_lanes(squares);
    for (; d < H; d++) sum += row[d] * row[d];
    return 1.0f / sqrtf(sum / (float)H + eps);
}

/* out = x / rms(x) * weight per row. */
static void rms_norm_rows(const float *x, const float *weight, float *out, long N, long H,
                          float eps) {
#pragma omp for schedule(static)
    for (long t = 0; t < N; t++) {
        const float *row = x + t * H;
        float inverse = inverse_rms(row, H, eps);
        for (long d = 0; d < H; d++) out[t * H + d] = row[d] * inverse * weight[d];
    }
}

/* x[0:D] = x / rms(x) * weight, in place: one head (Qwen3's q/k norms), summed as
 * rms_norm_rows sums a row. */
static void rms_norm_head(float *x, const float *weight, long D, float eps) {
    float inverse = inverse_rms(x, D, eps);
    for (long d = 0; d < D; d++) x[d] = x[d] * inverse * weight[d];
}

/* x[t] += sublayer[t] / rms(sublayer[t]) * weight per row (Gemma's post norms). */
static void add_normed_rows(float *x, const float *sublayer, const float *weight, long N,
                            long H, float eps) {
#pragma omp for schedule(static)
    for (long t = 0; t < N; t++) {
        const float *row = sublayer + t * H;
        float inverse = inverse_rms(row, H, eps);
        for (long d = 0; d < H; d++) x[t * H + d] += row[d] * inverse * weight[d];
    }
}

/* Normalize the q and k heads of each qkv row when the layer has q/k norms, rotate them
 * (x * cos + rotate_half(x) * sin), then store the row's keys and values at its slot. */
static void rotate_and_store_rows(const stack_desc *m, const layer_desc *layer,
                                  const step_desc *s, float *qkv, long width) {
    long D = m->head_dim, half = D / 2, rotated = m->num_heads + m->num_kv_heads;
    long head_elems = m->num_blocks * m->block_size * D;
    const float *cos_rows = layer->local_rope ? s->local_cos : s->cos;
    const float *sin_rows = layer->local_rope ? s->local_sin : s->sin;
#pragma omp for schedule(static)
    for (long t = 0; t < s->num_tokens; t++) {
        float *row = qkv + t * width;
        const float *cos = cos_rows + t * D, *sin = sin_rows + t * D;
        for (long h = 0; h < rotated; h++) {
            float *x = row + h * D, before[D];
            if (layer->q_norm) rms_norm_head(x, h < m->num_heads ? layer->q_norm : layer->k_norm, D, m->eps);
            memcpy(before, x, sizeof before);
            for (long i = 0; i < D; i++)
                x[i] = before[i] * cos[i] + before[i < half ? i + half : i - half] * sin[i];
        }
        const float *k = row + m->num_heads * D, *v = k + m->num_kv_heads * D;
        for (long h = 0; h < m->num_kv_heads; h++) {
            memcpy(layer->keys + h * head_elems + s->slots[t] * D, k + h * D, sizeof(float) * D);
            memcpy(layer->values + h * head_elems + s->slots[t] * D, v + h * D, sizeof(float) * D);
        }
    }
}

/* act = silu(gate) * up per row; gate_up rows hold gate then up. */
static void swiglu_rows(const float *gate_up, float *act, long N, long I) {
#pragma omp for schedule(static)
    for (long t = 0; t < N; t++) {
        const float *gate = gate_up + t * 2 * I, *up = gate + I;
        float *out = act + t * I;
        long i = 0;
        for (; i + LANES <= I; i += LANES) {
            vecf g = load(gate + i), minus = -g;
            minus = blend(minus > broadcast(88.0f), broadcast(88.0f), minus); /* e^88 ~ inf */
            store(out + i, g / (broadcast(1.0f) + exp_upto_88(minus)) * load(up + i));
        }
        for (; i < I; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* act = gelu_tanh(gate) * up per row (GeGLU): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715
 * g^3))), tanh(y) as 1 - 2 / (e^2y + 1) with 2y clamped to 88 (tanh is 1 there). */
static void geglu_rows(const float *gate_up, float *act, long N, long I) {
    const float k = 0.7978845608f; /* sqrt(2 / pi) */
#pragma omp for schedule(static)
    for (long t = 0; t < N; t++) {
        const float *gate = gate_up + t * 2 * I, *up = gate + I;
        float *out = act + t * I;
        long i = 0;
        for (; i + LANES <= I; i += LANES) {
            vecf g = load(gate + i);
            vecf twice = broadcast(2.0f * k) * (g + broadcast(0.044715f) * g * g * g);
            twice = blend(twice > broadcast(88.0f), broadcast(88.0f), twice);
            vecf tanh = broadcast(1.0f) - broadcast(2.0f) / (exp_upto_88(twice) + broadcast(1.0f));
            store(out + i, broadcast(0.5f) * g * (broadcast(1.0f) + tanh) * load(up + i));
        }
        for (; i < I; i++) {
            float g = gate[i];
            out[i] = 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * up[i];
        }
    }
}

void lamina_decoder_stack(const stack_desc *m, const step_desc *s) {
    long N = s->num_tokens, H = m->hidden, D = m->head_dim, I = m->intermediate;
    if (N == 0) return;
    long q_size = m->num_heads * D, width = q_size + 2 * m->num_kv_heads * D;
    float *normed = s->work;                 /* [N, H] */
    float *qkv = normed + N * H;             /* [N, width] */
    float *attended = qkv + N * width;       /* [N, q_size] */
    float *gate_up = attended + N * q_size;  /* [N, 2 I] */
    float *act = gate_up + N * 2 * I;        /* [N, I] */
    long stride = score_stride(s->num_keys, N);
    long *starts = malloc(sizeof(long) * (N + 1));
    long tiles = make_tiles(s->token_seq, s->num_keys, N, starts);
    long *claimed = calloc(m->num_layers, sizeof(long)); /* attention's item counter, a layer */
    long widest = H > q_size ? H : q_size; /* the matmuls' inputs: H, q_size or I features */
    widest = widest > I ? widest : I;
    void *rounded = calloc(rounded_rows_floats(N, widest), sizeof(float)); /* bf16 weights */
#pragma omp parallel
    {
        float *scratch = malloc(sizeof(float) * TILE * stride);
        for (long l = 0; l < m->num_layers; l++) {
            const layer_desc *layer = m->layers + l;
            int sandwich = layer->post_feedforward_norm != NULL;
            attention_args a = {qkv, width, layer->keys, layer->values, m->num_blocks,
                                m->block_size, s->tables, s->table_stride, s->token_seq,
                                s->num_keys, attended, m->num_heads, m->num_kv_heads, D,
                                m->scale, layer->window, m->softcap};
            rms_norm_rows(s->x, layer->input_norm, normed, N, H, m->eps);
            linear_phase(&layer->qkv, normed, H, N, s->split, qkv, 0, rounded);
            rotate_and_store_rows(m, layer, s, qkv, width);
            attention_items(&a, starts, tiles, scratch, stride, claimed + l);
            if (sandwich) { /* o's output into `normed` (free until the next norm), normed, added */
                linear_phase(&layer->o, attended, q_size, N, s->split, normed, 0, rounded);
                add_normed_rows(s->x, normed, layer->post_attention_norm, N, H, m->eps);
                rms_norm_rows(s->x, layer->pre_feedforward_norm, normed, N, H, m->eps);
            } else {
                linear_phase(&layer->o, attended, q_size, N, s->split, s->x, 1, rounded);
                rms_norm_rows(s->x, layer->post_attention_norm, normed, N, H, m->eps);
            }
            linear_phase(&layer->gate_up, normed, H, N, s->split, gate_up, 0, rounded);
            if (m->activation == ACT_GELU_TANH) geglu_rows(gate_up, act, N, I);
            else swiglu_rows(gate_up, act, N, I);
            if (sandwich) {
                linear_phase(&layer->down, act, I, N, s->split, normed, 0, rounded);
                add_normed_rows(s->x, normed, layer->post_feedforward_norm, N, H, m->eps);
            } else {
                linear_phase(&layer->down, act, I, N, s->split, s->x, 1, rounded);
            }
        }
        free(scratch);
    }
    free(starts);
    free(claimed);
    free(rounded);
}
