"""ModelRunner: the engine's Runner. Scheduled sequences in, one sampled token per sequence out.

One step: flatten the scheduled tokens (decode sequences first, so attention can batch
them), build positions and attention metadata, run the model, compute logits only at
the last token of the sequences that sample, sample, and map results back to the
scheduler's order. The runner reads sequences and never mutates them.

A sequence with a speculative draft (ScheduledSeq.draft_token_ids) computes its last
known token and the draft after it, and samples at each of those rows, each row as if
the draft tokens before it had been sampled (its seeded draw, penalties and min_tokens
see that output): SampleOutput.after_drafts. The scheduler keeps what the draft got right.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections import Counter
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from app.config import Settings
from app.core import (
    PromptResult,
    SampleOutput,
    SamplingParams,
    ScheduledBatch,
    ScheduledSeq,
    Sequence,
)
from app.model.attention import build_attention_metadata, calibrate_min_query_rows, key_bucket
from app.model.cache_sizing import num_cache_blocks
from app.model.config import ModelConfig, read_eos_token_ids
from app.model.constraint_masks import ConstraintMasks, PendingMasks
from app.model.cpu_threads import default_num_threads
from app.model.cuda_graphs import DecodeGraphs
from app.model.draft import draft_kv_cache, load_draft_model
from app.model.families import read_model_config
from app.model.fused_layers import run_decoder
from app.model.gguf_folder import file_weight_dtype
from app.model.host_memory import keep_freed_memory_in_heap, release_freed_heap
from app.model.kv_cache import GIB, KVCache
from app.model.linear import RowKinds, cpu_native_kernels
from app.model.llama import LlamaForCausalLM
from app.model.loader import load_model
from app.model.memory_report import MemoryReport, measure_memory
from app.model.prompt_outputs import PromptOutputs
from app.model.sampler import Sampler, SamplingRequest
from app.native.panels import INT4, weight_kind_name

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA GPU")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': fp32 on CPU (fast and exact there), bf16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


# Linear-weight storage: the model dtypes, int8 blocks (a scale per 32 weights) and 4-bit
# blocks (a scale and a minimum per 32; their panels are bytes)
_WEIGHT_DTYPES = {**_DTYPES, "int8": torch.int8, "int4": INT4}


def weight_storage(settings: Settings, device: torch.device, dtype: torch.dtype) -> str:
    """LAMINA_WEIGHT_DTYPE, with `auto` for a GGUF file's folder: the storage that keeps
    the file's quantized weights (gguf_folder.file_weight_dtype), said in the log, where
    lamina's native kernels can hold it (the CPU, fp32 activations); elsewhere the
    model dtype, as for any folder."""
    if settings.weight_dtype != "auto":
        return settings.weight_dtype
    from_file = file_weight_dtype(settings.model)
    if from_file is None:
        return "auto"
    on_cpu = device.type == "cpu"
    if not (on_cpu and cpu_native_kernels(dtype, settings.native_kernels) is not None):
        logger.info(
            "weights: the model dtype; the GGUF file's %s storage needs lamina's native CPU "
            "kernels with fp32 activations, which this start does not run",
            from_file,
        )
        return "auto"
    logger.info("weights: %s, as the GGUF file stores them (LAMINA_WEIGHT_DTYPE=auto)", from_file)
    return from_file


def resolve_weight_dtype(name: str, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """Linear-weight storage precision; None: the model dtype. Only the CPU honours it."""
    if name == "auto" or _WEIGHT_DTYPES[name] == dtype:
        return None
    if device.type != "cpu":
        logger.warning("weight_dtype=%s applies to the CPU only; ignored on %s", name, device)
        return None
    return _WEIGHT_DTYPES[name]


def draft_weight_dtype(
    settings: Settings, device: torch.device, dtype: torch.dtype
) -> torch.dtype | None:
    """The draft model's linear-weight storage: LAMINA_SPECULATIVE_WEIGHT_DTYPE, with
    `auto` meaning the served model's."""
    storage = settings.speculative_weight_dtype
    if storage == "auto":
        storage = weight_storage(settings, device, dtype)
    return resolve_weight_dtype(storage, device, dtype)


def matmul_storage(model: torch.nn.Module) -> str:
    """How the linear layers' weights are stored, in words: one kind ("int4"), or each
    kind with its number of projections ("int4 x 16, int8 x 104"), then the output
    head's when it differs ("int4; head int8"). A GGUF file's 4-bit mix and int4's int8
    head make one word misleading."""
    head = getattr(model.lm_head, "kernel", None)
    kinds = Counter(
        weight_kind_name(module.kernel.matmul_dtype)
        for module in model.modules()
        if module is not model.lm_head and getattr(module, "kernel", None) is not None
    )
    layers = ", ".join(
        kind if len(kinds) == 1 else f"{kind} x {count}" for kind, count in kinds.most_common()
    )
    head_kind = weight_kind_name(head.matmul_dtype if head is not None else model.dtype)
    if not layers:
        return head_kind
    return layers if kinds.keys() == {head_kind} else f"{layers}; head {head_kind}"


@dataclass
class _FlatBatch:
    """The step's inputs in model order (decode sequences first)."""

    order: list[int]  # model order -> index in batch.seqs
    input_ids: list[int]  # [N]
    query_lens: list[int]  # [B] new tokens per sequence
    context_lens: list[int]  # [B] tokens already cached
    block_tables: list[list[int]]  # [B] each sequence's table
    prompt_rows: list[int]  # [B] leading rows of each chunk that are prompt tokens
    # [B] whether each sequence's prompt rows feed its prompt outputs (logprobs, pooling)
    collects: list[bool] = dataclasses.field(default_factory=list)


class ModelRunner:
    """Owns the model, the KV cache and the sampler. Used by the engine thread only."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        *,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        seed: int = 0,
        batch_invariant: bool = True,
        num_threads: int | None = None,
        cuda_graphs: bool = False,
        max_num_seqs: int = 64,
    ) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        # Speculative decoding's draft model (app/model/draft.py), when one is configured
        self.draft_runner: ModelRunner | None = None
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.num_blocks = kv_cache.num_blocks
        self.max_model_len = max_model_len
        self.device = model.device
        self.dtype = model.dtype
        # lamina's CPU kernels (set only on the CPU) have a multi-threaded argmax.
        argmax = model.native.argmax_rows if model.native is not None else None
        self.sampler = Sampler(eos_token_ids, self.device, seed, argmax)
        self.constraint_masks = ConstraintMasks(self.config.vocab_size, max_num_seqs)
        self.prompt_outputs = PromptOutputs(self._prompt_logits)
        kernel = getattr(model.lm_head, "kernel", None)
        self.matmul_dtype = kernel.matmul_dtype if kernel is not None else self.dtype
        # fp16 weights on the CPU: prompt tokens' rows take a second kernel, chosen per row.
        self.splits_rows = model.splits_rows_by_kind
        self.batch_invariant = batch_invariant
        # CPU intra-op threads; applied again in whichever thread calls execute(), since
        # OpenMP keeps the thread count per calling thread.
        self.num_threads = num_threads if self.device.type == "cpu" else None
        self._threads_set_in: int | None = None
        # CUDA: torch's fused attention kernel (same kernel eagerly and inside graphs);
        # CPU: lamina's native kernel when it was built, else gather + bmm.
        self.attention_backend = model.attention_backend
        self.min_query_rows = 1  # for the "bmm" backend's batched matmuls
        if batch_invariant and self.attention_backend == "bmm":
            self.min_query_rows = calibrate_min_query_rows(
                self.device, self.dtype, self.config.head_dim
            )
        self.decode_graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            if self.config.generic:  # transformers' modules were never checked under capture
                logger.info("decode CUDA graphs off: the generic backend runs the model")
            elif self.config.sliding_window is None and self.config.local_window is None:
                self.enable_decode_graphs(max_num_seqs, use_cuda_graphs=True)
            else:  # their recorded masks have no window (cuda_graphs.py)
                logger.info("decode CUDA graphs off: the model has a sliding window")

    def enable_decode_graphs(self, max_batch: int, use_cuda_graphs: bool) -> None:
        """Run decode-only steps through DecodeGraphs (use_cuda_graphs=False: its eager
        twin, which tests use on the CPU)."""
        if self.config.sliding_window is not None or self.config.local_window is not None:
            raise ValueError("decode graphs have no sliding window")
        self.attention_backend = "sdpa"
        self.decode_graphs = DecodeGraphs(
            self._forward_logits,
            device=self.device,
            dtype=self.dtype,
            num_kv_heads=self.config.num_kv_heads,
            block_size=self.block_size,
            num_allocated_blocks=self.kv_cache.num_allocated_blocks,
            scratch_block=self.kv_cache.scratch_block,
            max_batch=max_batch,
            max_model_len=self.max_model_len,
            use_cuda_graphs=use_cuda_graphs,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRunner:
        """Load settings.model, pick device/dtype, size and allocate the KV cache."""
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        num_threads = None
        if device.type == "cpu":
            keep_freed_memory_in_heap()
            num_threads = settings.num_threads or default_num_threads()
            torch.set_num_threads(num_threads)  # before loading: packing runs threaded too
            logger.info("torch uses %d CPU threads", num_threads)
        weight_dtype = resolve_weight_dtype(weight_storage(settings, device, dtype), device, dtype)
        config = read_model_config(settings.model)
        max_model_len = settings.max_model_len or config.max_position_embeddings
        if max_model_len > config.max_position_embeddings:
            logger.warning(
                "max_model_len %d exceeds the model's max_position_embeddings %d",
                max_model_len,
                config.max_position_embeddings,
            )
        model = load_model(
            settings.model,
            device,
            dtype,
            max_positions=max_model_len,
            weight_dtype=weight_dtype,
            batch_invariant=settings.batch_invariant,
            kernels="auto" if settings.native_kernels else "torch",
        )
        draft_model = None
        if settings.speculative == "draft":
            draft_model = load_draft_model(
                settings,
                config,
                device,
                dtype,
                max_model_len,
                draft_weight_dtype(settings, device, dtype),
            )
        num_blocks = num_cache_blocks(
            model,
            settings,
            device,
            dtype,
            max_model_len,
            draft_config=draft_model.config if draft_model is not None else None,
        )
        kv_cache = KVCache(config, num_blocks, settings.block_size, device, dtype)
        if num_blocks * settings.block_size < max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, less than max_model_len %d",
                num_blocks * settings.block_size,
                max_model_len,
            )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB) on %s",
            num_blocks,
            settings.block_size,
            kv_cache.num_bytes / GIB,
            device,
        )
        runner = cls(
            model,
            kv_cache,
            max_model_len=max_model_len,
            eos_token_ids=read_eos_token_ids(settings.model),
            seed=settings.seed,
            batch_invariant=settings.batch_invariant,
            num_threads=num_threads,
            cuda_graphs=settings.cuda_graphs,
            max_num_seqs=settings.max_num_seqs,
        )
        if draft_model is not None:
            runner.draft_runner = runner.build_draft_runner(settings, draft_model)
        return runner

    def build_draft_runner(
        self, settings: Settings, model: torch.nn.Module | None = None
    ) -> ModelRunner:
        """A runner of its own for the draft model `settings.speculative_model`
        (app/model/draft.py; raises DraftModelError for a draft with another vocabulary),
        with this one's device, dtype, context window and threads, its weights stored as
        `settings.speculative_weight_dtype` (auto: as this one's), and a KV cache of as
        many blocks as this one's. `model`: the draft, when already loaded (start-up
        loads it before sizing the caches). It runs past EOS: the served model decides
        where the output stops."""
        if model is None:
            model = load_draft_model(
                settings,
                self.config,
                self.device,
                self.dtype,
                self.max_model_len,
                draft_weight_dtype(settings, self.device, self.dtype),
            )
        kv_cache = draft_kv_cache(
            model.config, self.num_blocks, self.block_size, self.device, self.dtype
        )
        return ModelRunner(
            model,
            kv_cache,
            max_model_len=self.max_model_len,
            eos_token_ids=frozenset(),
            seed=settings.seed,
            batch_invariant=settings.batch_invariant,
            num_threads=self.num_threads,
            cuda_graphs=settings.cuda_graphs,
            max_num_seqs=settings.max_num_seqs,
        )

    def kernel_summary(self) -> dict[str, str]:
        """Which kernels compute this model, in words (GET /status, the dashboard)."""
        native = self.model.native
        summary = {
            "attention": self.attention_backend,
            "matmul": matmul_storage(self.model),
            "native_library": native.build.describe() if native is not None else "none",
        }
        if self.device.type == "cpu":
            fused = getattr(self.model, "fuse_layers", False)
            summary["decoder_layers"] = "fused native stack" if fused else "one op at a time"
        if self.decode_graphs is not None:
            summary["decode_graphs"] = "cuda graphs" if self.device.type == "cuda" else "eager"
        return summary

    def log_memory(self) -> MemoryReport:
        """Hand the heap's free memory back (what loading and warm-up freed), then log
        where the memory goes: weights, packed copies, KV cache, the draft model's, process
        RSS."""
        if self.device.type == "cpu":
            release_freed_heap()
        draft = self.draft_runner
        report = measure_memory(
            self.model, self.kv_cache, None if draft is None else (draft.model, draft.kv_cache)
        )
        report.log(self.device)
        return report

    # --- the Runner protocol -------------------------------------------------------

    def execute(self, batch: ScheduledBatch) -> list[SampleOutput | None]:
        """Compute `batch`; one SampleOutput per sequence whose `sample` is set, else None."""
        if not batch.seqs:
            return []
        self._apply_num_threads()
        flat = self._flatten(batch.seqs)
        masks = self._start_masks(batch, flat)  # computed while the model runs
        try:
            return self._run(batch, flat, masks)
        finally:
            if masks is not None:
                masks.settle()  # the buffer is reused next step, even after an error

    def _run(
        self, batch: ScheduledBatch, flat: _FlatBatch, masks: PendingMasks | None
    ) -> list[SampleOutput | None]:
        with torch.inference_mode():
            if self._fits_decode_graph(flat):
                logits = self.decode_graphs.run(
                    flat.input_ids, flat.context_lens, flat.block_tables
                )  # [B, vocab]: one row per sequence
                return self._sample(batch, flat, logits, True, masks)
            positions, metadata = build_attention_metadata(
                flat.query_lens,
                flat.context_lens,
                flat.block_tables,
                self.block_size,
                self.kv_cache.num_allocated_blocks,
                self.config.num_kv_heads,
                self.device,
                batch_invariant=self.batch_invariant,
                min_query_rows=self.min_query_rows,
                backend=self.attention_backend,
                mask_dtype=self.dtype,
                native=self.model.native if self.attention_backend == "native" else None,
                sliding_window=self.config.sliding_window,
                local_window=self.config.local_window,
            )
            input_ids = torch.tensor(flat.input_ids, dtype=torch.int64).to(self.device)
            kinds = self._row_kinds(flat) if self.splits_rows else None  # of the N rows
            # [N, hidden], through the fused native stack or one op at a time
            hidden = run_decoder(self.model, input_ids, positions, metadata, self.kv_cache, kinds)
            self._collect_prompt_outputs(batch, flat, hidden)
            return self._sample(batch, flat, hidden, False, masks)

    def _collect_prompt_outputs(
        self, batch: ScheduledBatch, flat: _FlatBatch, hidden: torch.Tensor
    ) -> None:
        """Hand the prompt rows of the sequences that want prompt outputs to
        PromptOutputs; hidden: [N, hidden] of every row, in model order."""
        row = 0
        for position, index in enumerate(flat.order):
            num_prompt_rows = flat.prompt_rows[position]
            if flat.collects[position] and num_prompt_rows:
                rows = hidden[row : row + num_prompt_rows]  # [P, hidden]
                seq = batch.seqs[index].seq
                self.prompt_outputs.collect(seq, flat.context_lens[position], rows)
            row += flat.query_lens[position]

    def _prompt_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, hidden] prompt rows -> [R, vocab]: the head, with the prompt rows' kernels."""
        kinds = None
        if self.splits_rows:
            kinds = RowKinds.from_flags([True] * hidden.shape[0], self.device)
        return self.model.compute_logits(hidden, kinds)

    def _start_masks(self, batch: ScheduledBatch, flat: _FlatBatch) -> PendingMasks | None:
        """Start the grammar masks of the constrained sequences that sample this step;
        sampler rows follow model order, as in _sample."""
        constrained, row = [], 0
        for index in flat.order:
            scheduled = batch.seqs[index]
            if not scheduled.sample:
                continue
            if scheduled.seq.constraint_matcher is not None:  # never drafts
                constrained.append((row, scheduled.seq.constraint_matcher))
            row += 1 + len(scheduled.draft_token_ids)
        return self.constraint_masks.start(constrained)

    def _sample(
        self,
        batch: ScheduledBatch,
        flat: _FlatBatch,
        rows: torch.Tensor,
        rows_are_sequences: bool,
        masks: PendingMasks | None = None,
    ) -> list[SampleOutput | None]:
        """Logits of the sampling sequences' last tokens, then the sampler.

        rows: hidden states [N, hidden] of every token, or (decode graphs) logits
        [B, vocab] of every sequence.
        """
        picked, sampling = [], []  # rows that sample, each sampling sequence's batch index
        picked_is_prompt = []  # whether each picked row is a prompt token
        requests: list[SamplingRequest] = []  # one per picked row
        row_end = 0
        for position, index in enumerate(flat.order):
            num_rows = flat.query_lens[position]
            row_end += num_rows
            scheduled = batch.seqs[index]
            if not scheduled.sample:
                continue
            sampling.append(index)
            if rows_are_sequences:
                picked.append(position)
            else:  # the last known token's row, then the draft's
                num_picked = 1 + len(scheduled.draft_token_ids)
                picked.extend(range(row_end - num_picked, row_end))
            # A picked row is a prompt token only if every row of the chunk is.
            num_picked = len(picked) - len(requests)
            is_prompt = flat.prompt_rows[position] == num_rows
            picked_is_prompt.extend([is_prompt] * num_picked)
            requests.extend(_sampling_requests(scheduled))
        results: list[SampleOutput | None] = [None] * len(batch.seqs)
        token_bitmask = masks.wait() if masks is not None else None
        if not sampling:
            return results
        if rows_are_sequences and len(picked) == rows.shape[0]:
            logits = rows
        else:
            selected = rows[torch.tensor(picked, device=self.device)]  # [S, hidden or vocab]
            if rows_are_sequences:
                logits = selected
            else:
                kinds = None
                if self.splits_rows:
                    kinds = RowKinds.from_flags(picked_is_prompt, self.device)  # of the S rows
                logits = self.model.compute_logits(selected, kinds)  # [S, vocab]
        outputs = self.sampler(logits, requests, token_bitmask)  # from [S, vocab]
        row = 0
        for index in sampling:
            num_drafts = len(batch.seqs[index].draft_token_ids)
            first, following = outputs[row], tuple(outputs[row + 1 : row + 1 + num_drafts])
            results[index] = dataclasses.replace(first, after_drafts=following)
            row += 1 + num_drafts
        return results

    def _forward_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata
    ) -> torch.Tensor:
        """Model forward plus logits of every row: what a decode graph records."""
        hidden = run_decoder(self.model, input_ids, positions, metadata, self.kv_cache)
        return self.model.compute_logits(hidden)

    def _fits_decode_graph(self, flat: _FlatBatch) -> bool:
        if self.decode_graphs is None or any(n != 1 for n in flat.query_lens):
            return False
        if any(flat.collects):  # graphs give logits, prompt outputs need hidden states
            return False
        if self.splits_rows:  # graphs record one kernel per Linear; these rows need two
            return False
        return self.decode_graphs.supports(len(flat.query_lens), max(flat.context_lens) + 1)

    def release(self, seq_ids: SequenceOf[int]) -> None:
        """Forget prompt outputs still being collected (seeded sampling keeps no state:
        it derives its noise from the output position)."""
        self.prompt_outputs.release(seq_ids)

    def take_prompt_result(self, seq_id: int) -> PromptResult:
        """The Runner protocol's prompt outputs of a sequence (prompt_outputs.py)."""
        return self.prompt_outputs.take(seq_id)

    def warmup(self) -> None:
        """A tiny prefill and decode step (greedy and random, with logprobs), off the books,
        and the draft model's (if any).

        Writes junk into the first cache blocks: call it before serving, not during.
        """
        if self.draft_runner is not None:
            self.draft_runner.warmup()
        num_prompt = max(1, min(16, self.max_model_len - 2, self.num_blocks * self.block_size - 2))
        blocks = list(range(math.ceil((num_prompt + 1) / self.block_size)))
        seqs = [
            Sequence("warmup-0", list(range(1, num_prompt + 1)), SamplingParams(temperature=0), 2),
            Sequence(
                "warmup-1",
                list(range(1, num_prompt + 1)),
                SamplingParams(temperature=0.8, top_k=20, top_p=0.9, logprobs=2),
                2,
            ),
        ]
        for seq in seqs:
            seq.block_table = blocks  # both share blocks: their contents are junk anyway
        prefill = [ScheduledSeq(seq, num_prompt, sample=True) for seq in seqs[:1]]
        (first,) = self.execute(ScheduledBatch(prefill, num_prompt))
        for seq in seqs:  # playing the engine's part on our own fake sequences
            seq.output_token_ids.append(first.token_id)
            seq.num_computed_tokens = num_prompt
        self.execute(ScheduledBatch([ScheduledSeq(seq, 1, sample=True) for seq in seqs], 2))

    def _apply_num_threads(self) -> None:
        if self.num_threads is None:
            return
        thread = threading.get_ident()
        if self._threads_set_in != thread:
            torch.set_num_threads(self.num_threads)
            self._threads_set_in = thread

    # --- inputs --------------------------------------------------------------------

    def _flatten(self, scheduled: list[ScheduledSeq]) -> _FlatBatch:
        # Stable sort: single-token sequences first, grouped by the number of keys they
        # attend over, so attention batches each group in one pair of matmuls.
        order = sorted(range(len(scheduled)), key=lambda i: self._order_key(scheduled[i]))
        flat = _FlatBatch(order, [], [], [], [], [])
        for index in order:
            item = scheduled[index]
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            self._check(item, start, end)
            num_known = end - len(item.draft_token_ids)
            flat.input_ids.extend(_token_slice(seq, start, num_known))
            flat.input_ids.extend(item.draft_token_ids)
            flat.query_lens.append(item.num_new_tokens)
            flat.context_lens.append(start)
            flat.block_tables.append(seq.block_table)
            flat.prompt_rows.append(seq.num_prompt_tokens_in(start, item.num_new_tokens))
            flat.collects.append(seq.needs_prompt_result)
        return flat

    def _row_kinds(self, flat: _FlatBatch) -> RowKinds:
        """The kind of each of the step's N rows: prompt while its position is below its
        sequence's prompt length, generated after, however the sequence was chunked or
        recomputed (a recompute after preemption runs generated tokens again)."""
        is_prompt: list[bool] = []  # [N]
        for num_new, num_prompt in zip(flat.query_lens, flat.prompt_rows):
            is_prompt += [True] * num_prompt + [False] * (num_new - num_prompt)
        return RowKinds.from_flags(is_prompt, self.device)

    def _order_key(self, item: ScheduledSeq) -> tuple[int, int]:
        if item.num_new_tokens != 1:
            return (1, 0)
        return (0, key_bucket(item.seq.num_computed_tokens + 1, self.block_size))

    def _check(self, item: ScheduledSeq, start: int, end: int) -> None:
        """Cheap contract checks: a broken batch raises here, not as a garbled cache."""
        seq = item.seq
        if item.num_new_tokens < 1:
            raise ValueError(f"seq {seq.seq_id}: num_new_tokens must be >= 1")
        num_tokens = seq.num_tokens + len(item.draft_token_ids)
        if end > num_tokens:
            raise ValueError(f"seq {seq.seq_id}: scheduled up to {end} of {num_tokens} tokens")
        if item.draft_token_ids and not (item.sample and seq.output_token_ids):
            raise ValueError(f"seq {seq.seq_id}: a draft only follows a decoding sequence")
        if end > self.max_model_len:
            raise ValueError(f"seq {seq.seq_id}: {end} tokens exceed max_model_len")
        if item.sample and end != num_tokens:
            raise ValueError(f"seq {seq.seq_id}: samples before its last known token")
        needed = -(-end // self.block_size)
        if len(seq.block_table) < needed:
            raise ValueError(
                f"seq {seq.seq_id}: block table has {len(seq.block_table)} blocks, needs {needed}"
            )
        used = seq.block_table[:needed]  # the cached prefix is read too
        if min(used) < 0 or max(used) >= self.num_blocks:
            raise ValueError(f"seq {seq.seq_id}: block id outside 0..{self.num_blocks - 1}")


def _token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """seq.all_token_ids[start:end] without concatenating the whole history each step."""
    num_prompt = seq.num_prompt_tokens
    if start >= num_prompt:
        return seq.output_token_ids[start - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return seq.prompt_token_ids[start:end]
    return seq.prompt_token_ids[start:] + seq.output_token_ids[: end - num_prompt]


def _sampling_requests(scheduled: ScheduledSeq) -> list[SamplingRequest]:
    """One per row that samples: the last known token's, then one per draft token, each
    seeing the draft tokens before it as output (its seeded draw's position, penalties,
    min_tokens), exactly as if they had been sampled."""
    seq, drafts = scheduled.seq, scheduled.draft_token_ids
    outputs = [seq.output_token_ids]
    outputs += [seq.output_token_ids + list(drafts[: j + 1]) for j in range(len(drafts))]
    return [SamplingRequest(seq.params, seq.prompt_token_ids, out, seq.index) for out in outputs]
