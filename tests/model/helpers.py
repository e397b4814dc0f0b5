"""Test helpers shared by tests/model and tests/unit: naive block allocation, a tiny
engine loop over a runner, and direct model calls through the paged cache."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import torch

from app.core import SampleOutput, SamplingParams, ScheduledBatch, ScheduledSeq, Sequence
from app.model.attention import build_attention_metadata
from app.model.fused_layers import run_decoder
from app.model.kv_cache import KVCache
from app.model.linear import RowKinds

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


class NaiveBlockAllocator:
    """Hands out free blocks in a scrambled order, so tables are never contiguous by luck."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))[::-1]  # reversed: tables run backwards

    def reserve(self, block_table: list[int], num_tokens: int) -> None:
        while len(block_table) * self.block_size < num_tokens:
            block_table.append(self.free.pop(0 if len(self.free) % 2 else -1))

    def release(self, block_table: list[int]) -> None:
        self.free.extend(block_table)
        block_table.clear()


def make_sequence(
    prompt: list[int], params: SamplingParams = GREEDY, max_tokens: int = 32, index: int = 0
) -> Sequence:
    return Sequence(
        request_id="test",
        prompt_token_ids=list(prompt),
        params=params,
        max_tokens=max_tokens,
        index=index,
    )


def engine_step(runner, allocator: NaiveBlockAllocator, work: list[tuple[Sequence, int]]):
    """Schedule `num_new_tokens` for each sequence, run the step, then apply the results as
    the engine would (the runner itself never mutates sequences)."""
    scheduled = []
    for seq, num_new in work:
        end = seq.num_computed_tokens + num_new
        allocator.reserve(seq.block_table, end)
        scheduled.append(ScheduledSeq(seq, num_new, sample=end == seq.num_tokens))
    outputs: list[SampleOutput | None] = runner.execute(
        ScheduledBatch(scheduled, sum(n for _, n in work))
    )
    for (seq, num_new), output in zip(work, outputs):
        seq.num_computed_tokens += num_new
        if output is not None:
            seq.output_token_ids.append(output.token_id)
    return outputs


def generate(
    runner,
    allocator: NaiveBlockAllocator,
    seqs: list[Sequence],
    eos_token_ids: frozenset[int],
    max_chunk_tokens: int = 10**9,
) -> list[list[int]]:
    """Run all sequences together to completion (max_tokens or EOS); prompts are prefilled
    in chunks of at most `max_chunk_tokens`, mixed with other sequences' decodes."""
    running = list(seqs)
    while running:
        work = [
            (seq, min(max_chunk_tokens, seq.num_tokens - seq.num_computed_tokens))
            for seq in running
        ]
        engine_step(runner, allocator, work)
        for seq in list(running):
            done = seq.output_token_ids and (
                len(seq.output_token_ids) >= seq.max_tokens
                or seq.output_token_ids[-1] in eos_token_ids
            )
            if done:
                running.remove(seq)
                allocator.release(seq.block_table)
    return [seq.output_token_ids for seq in seqs]


@dataclass
class Chunk:
    """Tokens of one sequence to run in one step, after `num_context` cached ones."""

    token_ids: list[int]
    num_context: int
    block_table: list[int]


def model_logits(
    model, cache: KVCache, chunks: list[Chunk], kinds: RowKinds | None = None
) -> list[torch.Tensor]:
    """Logits for every token of every chunk ([len(chunk), vocab] each), in one forward.

    Chunks run in the order given; put single-token chunks first to take the decode path.
    kinds: the rows' token kinds, for models with fp16 weights (one kind for all rows).
    """
    device = model.device
    backend = model.attention_backend
    positions, metadata = build_attention_metadata(
        [len(c.token_ids) for c in chunks],
        [c.num_context for c in chunks],
        [c.block_table for c in chunks],
        cache.block_size,
        cache.num_allocated_blocks,
        model.config.num_kv_heads,
        device,
        backend=backend,
        mask_dtype=model.dtype,
        native=model.native if backend == "native" else None,
        sliding_window=model.config.sliding_window,
        local_window=model.config.local_window,
    )
    input_ids = torch.tensor([t for c in chunks for t in c.token_ids], device=device)
    with torch.inference_mode():
        hidden = run_decoder(model, input_ids, positions, metadata, cache, kinds)
        logits = model.compute_logits(hidden, kinds)
    return list(logits.float().cpu().split([len(c.token_ids) for c in chunks]))


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits for one sequence: [len, vocab] fp32 on the CPU."""
    device = next(hf_model.parameters()).device
    with torch.inference_mode():
        out = hf_model(torch.tensor([token_ids], device=device)).logits[0]
    return out.float().cpu()


def hf_greedy(model_path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy continuation of each prompt, one at a time (the reference)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    expected = []
    for p in prompts:
        out = hf.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.int64),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
        expected.append(out[0, len(p) :].tolist())
    return expected


def save_random_llama(out_dir, seed: int = 0, **overrides):
    """Write a small random LlamaForCausalLM (transformers' own layout) to out_dir."""
    return save_random_model(out_dir, "LlamaConfig", seed, random_norms=False, **overrides)


def save_random_model(
    out_dir, config_class: str, seed: int = 0, random_norms: bool = True, **overrides
):
    """Write a small random model of transformers' `config_class` (LlamaConfig,
    Qwen2Config, ...) to out_dir: 2 layers, hidden 64, GQA, unless overridden. Biases,
    which transformers initializes to 0, are drawn at random, and so are the norms'
    weights (1) with random_norms."""
    import transformers

    fields = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    shard_size = fields.pop("max_shard_size", None)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make biases and norm weights count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
            elif random_norms and name.endswith("norm.weight"):
                param.normal_(1, 0.2)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return out_dir


def check_logits_parity(
    model_dir,
    prompt_len: int = 37,
    seed: int = 0,
    kernels: str = "auto",
    fused: bool = True,
    max_positions: int | None = None,
) -> None:
    """Full prefill, chunked prefill, decode steps and a mixed batch, all vs transformers
    (fp32 logits within 1e-4). kernels "auto" runs lamina's native kernels (the fused
    decoder stack, or one op at a time with fused=False); "torch" torch's ops.
    max_positions: the context lamina serves (default max_position_embeddings)."""
    from transformers import AutoModelForCausalLM

    from app.model.loader import load_model

    ours = load_model(model_dir, kernels=kernels, max_positions=max_positions)
    if fused and kernels == "auto" and ours.native is not None:
        assert ours.fuse_layers, "every Linear is native: the layers must fuse"
    ours.fuse_layers = fused and ours.fuse_layers
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = ours.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    seq_a = torch.randint(0, vocab, (prompt_len,), generator=generator).tolist()
    seq_b = torch.randint(0, vocab, (prompt_len // 2,), generator=generator).tolist()
    cache = KVCache(ours.config, 64, PARITY_BLOCK_SIZE, torch.device("cpu"), torch.float32)
    allocator = NaiveBlockAllocator(64, PARITY_BLOCK_SIZE)
    table_a: list[int] = []
    table_b: list[int] = []
    allocator.reserve(table_a, len(seq_a))
    allocator.reserve(table_b, len(seq_b))
    ref_a, ref_b = hf_logits(hf, seq_a), hf_logits(hf, seq_b)

    # Step 1: a fresh prefill of a's first 10 tokens next to all of b but its last token.
    part_a, part_b = model_logits(
        ours, cache, [Chunk(seq_a[:10], 0, table_a), Chunk(seq_b[:-1], 0, table_b)]
    )
    # Step 2: b decodes its last token while a prefills a chunk after its cached prefix.
    step_b, step_a = model_logits(
        ours, cache, [Chunk(seq_b[-1:], len(seq_b) - 1, table_b), Chunk(seq_a[10:30], 10, table_a)]
    )
    # Steps 3+: a decodes token by token.
    decodes = [
        model_logits(ours, cache, [Chunk([seq_a[p]], p, table_a)])[0] for p in range(30, len(seq_a))
    ]
    ours_a = torch.cat([part_a, step_a, *decodes])
    ours_b = torch.cat([part_b, step_b])
    assert (ours_a - ref_a).abs().max() < PARITY_ATOL
    assert (ours_b - ref_b).abs().max() < PARITY_ATOL


PARITY_ATOL = 1e-4  # fp32 on the CPU, a few layers
PARITY_BLOCK_SIZE = 4  # small blocks: every test crosses many block boundaries


def copy_with_another_vocabulary(model_dir, out_dir):
    """A copy of model_dir whose tokenizer swaps the ids of tokens 1000 and 1001: the same
    token strings, but ids that mean other text (a draft model that must be refused)."""
    shutil.copytree(model_dir, out_dir)
    tokenizer = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = (token for token, token_id in vocab.items() if token_id in (1000, 1001))
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out_dir
