"""Test doubles for the engine: a byte-level FakeTokenizer and a FakeRunner with a fake KV cache.

Both are deterministic and torch-free, so engine and scheduler tests run in milliseconds.

FakeRunner keeps a "KV cache" that stores, for every slot, the token id whose K/V a real
model would have written there. When a sequence samples, its whole context is read back
through its block table and must equal its tokens: a wrong block table, a block shared
that should not be, or a prefix-cache hit on the wrong content fails loudly. The sampled
token is derived from the context read back, so outputs depend only on a sequence's
tokens (and its choice index), never on batching, chunking, preemption or caching.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf

from app.core import SampleOutput, ScheduledBatch, ScheduledSeq, Sequence

NextTokenFn = Callable[[list[int], Sequence], int]


class FakeTokenizer:
    """A byte-level tokenizer: ids 0-2 are special, id b + 3 is the byte b.

    Multi-byte UTF-8 characters span several tokens, which exercises the detokenizer's
    incomplete-character guard exactly like a real byte-level BPE does.
    """

    PAD, BOS, EOS = 0, 1, 2
    NUM_SPECIAL = 3
    SPECIAL_TEXTS = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
    vocab_size = 256 + NUM_SPECIAL
    eos_token_ids = frozenset({EOS})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [byte + self.NUM_SPECIAL for byte in text.encode("utf-8")]
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, token_ids: SequenceOf[int], skip_special_tokens: bool = True) -> str:
        parts: list[str] = []
        pending = bytearray()
        for token_id in token_ids:
            if token_id >= self.NUM_SPECIAL:
                pending.append(token_id - self.NUM_SPECIAL)
                continue
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not skip_special_tokens:
                parts.append(self.SPECIAL_TEXTS[token_id])
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def is_special(self, token_id: int) -> bool:
        return token_id < self.NUM_SPECIAL

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)


def letter_token(context: list[int], seq: Sequence) -> int:
    """Default next token: a lowercase letter derived from the context and choice index."""
    tail = context[-8:] + [len(context), seq.index]
    digest = zlib.crc32(b"".join(t.to_bytes(4, "little") for t in tail))
    return FakeTokenizer.NUM_SPECIAL + ord("a") + digest % 26


class FakeRunner:
    """Implements app.engine.protocol.Runner without a model.

    eos_one_in: when > 0, the sampled token is EOS for about one context in that many
    (deterministically), so sequences finish at varied lengths.
    fail_token_id: if a scheduled sequence's prompt contains it, execute() raises
    (to test how the engine isolates a failing request).
    """

    def __init__(
        self,
        *,
        block_size: int = 4,
        num_blocks: int = 64,
        max_model_len: int = 256,
        next_token: NextTokenFn = letter_token,
        eos_token_id: int = FakeTokenizer.EOS,
        eos_one_in: int = 0,
        fail_token_id: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.next_token = next_token
        self.eos_token_id = eos_token_id
        self.eos_one_in = eos_one_in
        self.fail_token_id = fail_token_id
        # [num_blocks][block_size]: the token whose K/V sits in each slot (None: never written)
        self.kv_cache: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.num_steps = 0
        self.batch_sizes: list[tuple[int, int]] = []  # (num_seqs, num_batched_tokens) per step
        self.released: list[int] = []

    def execute(self, batch: ScheduledBatch) -> list[SampleOutput | None]:
        self._check_batch(batch)
        if self.fail_token_id is not None and any(
            self.fail_token_id in s.seq.prompt_token_ids for s in batch.seqs
        ):
            raise RuntimeError("fake runner: injected failure")
        # Like one forward pass: every new token's K/V is written before anyone reads.
        for scheduled in batch.seqs:
            seq = scheduled.seq
            start = seq.num_computed_tokens
            known = seq.all_token_ids + list(scheduled.draft_token_ids)
            tokens = known[start : start + scheduled.num_new_tokens]
            for position, token_id in enumerate(tokens, start):
                self._write(seq, position, token_id)
        self.num_steps += 1
        self.batch_sizes.append((len(batch.seqs), batch.num_batched_tokens))
        return [self._sample_scheduled(s) if s.sample else None for s in batch.seqs]

    def release(self, seq_ids: SequenceOf[int]) -> None:
        self.released.extend(seq_ids)

    def _check_batch(self, batch: ScheduledBatch) -> None:
        assert batch.num_batched_tokens == sum(s.num_new_tokens for s in batch.seqs)
        seen: set[int] = set()
        for scheduled in batch.seqs:
            seq = scheduled.seq
            assert seq.seq_id not in seen, "sequence scheduled twice in one step"
            seen.add(seq.seq_id)
            end = seq.num_computed_tokens + scheduled.num_new_tokens
            num_known = seq.num_tokens + len(scheduled.draft_token_ids)
            assert scheduled.num_new_tokens > 0
            assert end <= num_known <= self.max_model_len
            # a prompt-only sequence (max_tokens 0) never samples
            assert scheduled.sample == (end == num_known and seq.max_tokens > 0)
            assert len(seq.block_table) * self.block_size >= end, "block table too short"
            assert len(set(seq.block_table)) == len(seq.block_table), "block repeated in a table"
            assert all(0 <= b < self.num_blocks for b in seq.block_table)

    def _write(self, seq: Sequence, position: int, token_id: int) -> None:
        block_id = seq.block_table[position // self.block_size]
        self.kv_cache[block_id][position % self.block_size] = token_id

    def _read_context(self, seq: Sequence, num_tokens: int) -> list[int | None]:
        size = self.block_size
        return [
            self.kv_cache[seq.block_table[pos // size]][pos % size] for pos in range(num_tokens)
        ]

    def _sample_scheduled(self, scheduled: ScheduledSeq) -> SampleOutput:
        """The sample after the last known token, and after each draft token (as if the
        draft tokens before it had been sampled)."""
        seq, drafts = scheduled.seq, list(scheduled.draft_token_ids)
        first = self._sample(seq, seq.all_token_ids)
        following = tuple(
            self._sample(seq, seq.all_token_ids + drafts[: j + 1]) for j in range(len(drafts))
        )
        return SampleOutput(first.token_id, after_drafts=following)

    def _sample(self, seq: Sequence, tokens: list[int]) -> SampleOutput:
        context = self._read_context(seq, len(tokens))
        if context != tokens:
            raise AssertionError(f"KV cache of sequence {seq.seq_id} does not hold its tokens")
        if self.eos_one_in and zlib.crc32(repr(tokens).encode()) % self.eos_one_in == 0:
            return SampleOutput(token_id=self.eos_token_id)
        return SampleOutput(token_id=self.next_token(tokens, seq))
