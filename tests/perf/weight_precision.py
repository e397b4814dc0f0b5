"""How much half-precision and quantized weights (`Settings.weight_dtype`) change greedy
outputs vs fp32.

Run: `.venv/bin/python -m tests.perf.weight_precision [--new-tokens 64]`

Three numbers per weight dtype, over a fixed prompt set (chat questions and passages
of 5 to 300 tokens), fp32 weights as the reference:
- teacher-forced top-1 agreement: feed the fp32 greedy continuation to both models and
  count positions where the argmax agrees (no divergence cascade: the cleanest number);
- exact greedy match: prompts whose whole greedy continuation is identical;
- mean tokens before the first greedy divergence;
the last two read off the teacher-forced pass: every row's logits are the same bits
whatever rows are computed with it (batch invariance, tests/perf/test_batch_invariance.py),
so a dtype's own greedy run follows fp32's continuation exactly up to the first position
whose teacher-forced argmax differs, and parts from it there (`first_divergence`);
and the perplexity of a fixed text (tests/engine/corpus.py's passage, teacher-forced,
its rows through the weights' generation kernels), fp32's alongside.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass

import torch

from app.bench.corpus import PASSAGE
from app.config import load_settings
from app.core import SamplingParams
from app.engine.engine_core import EngineCore
from app.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three prime numbers greater than 50.",
    "Who wrote Pride and Prejudice?",
    "Give me a short tip for learning to cook.",
    "What is the boiling point of water at sea level?",
    "Describe a cat to someone who has never seen one.",
    "How do I reverse a list in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "What are the three primary colors?",
    "Why do we have seasons on Earth?",
]
SLICES = [(0, 5), (40, 33), (90, 64), (150, 121), (210, 200), (5, 287), (60, 17), (7, 150)]


def prompt_set(tokenizer: Tokenizer) -> list[list[int]]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    corpus = tokenizer.encode(PASSAGE)
    return chats + [corpus[start : start + length] for start, length in SLICES]


@dataclass
class Agreement:
    weight_dtype: str
    teacher_forced_top1: float  # fraction of positions whose argmax equals fp32's
    exact_greedy_match: float  # fraction of prompts with an identical continuation
    mean_tokens_before_divergence: float
    num_prompts: int
    num_new_tokens: int
    matmuls: str  # which kernels ran the Linears (matmul_kernels)
    perplexity: float  # of the passage, with these weights
    fp32_perplexity: float  # of the passage, fp32 weights


def runner_for(model_dir, weight_dtype: str):
    from app.model.runner import ModelRunner

    settings = load_settings(
        environ={},
        model=model_dir,
        device="cpu",
        dtype="float32",
        weight_dtype=weight_dtype,
        kv_cache_gb=0.25,
    )
    return ModelRunner.from_settings(settings), settings


def matmul_kernels(runner) -> str:
    """The kernels every Linear of the model runs on, in words: "native bfloat16 panels
    (AVX512-BF16 dot products)", "native float32 panels", "OneDnnLinearKernel"..."""
    from app.model.linear import Linear, NativeLinearKernel
    from app.native.panels import weight_kind_name

    kinds = set()
    for module in runner.model.modules():
        if isinstance(module, Linear):
            for kernel in (module.kernel, module.prompt_kernel):
                if isinstance(kernel, NativeLinearKernel):
                    kinds.add(f"native {weight_kind_name(kernel.panels.dtype)} panels")
                elif kernel is not None:
                    kinds.add(type(kernel).__name__)
    described = ", ".join(sorted(kinds))
    native = runner.model.native
    if native is not None and "native bfloat16 panels" in kinds:
        how = "AVX512-BF16 dot products" if native.bf16_dot_product else "widened to FMAs"
        if native.amx_bf16 and native.amx_status == "in use":
            how = "AMX tiles"
        described += f" ({how})"
    return described


def greedy(runner, settings, tokenizer, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """All prompts through the engine together, greedy, EOS ignored."""
    core = EngineCore(runner, tokenizer, settings)
    params = SamplingParams(max_tokens=num_new, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        assert core.add_request(str(i), prompt, params) == []
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_unfinished():
        for delta in core.step():
            assert delta.error is None, delta.error
            outputs[delta.request_id].extend(delta.token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]


def argmax_along(runner, token_ids: list[int], first: int) -> list[int]:
    """Greedy choice at every position >= first - 1 of token_ids (one prefill, no cache reuse)."""
    return logits_along(runner, token_ids, first).argmax(-1).tolist()


def logits_along(runner, token_ids: list[int], first: int) -> torch.Tensor:
    """The logits predicting token_ids[first:], [len - first, vocab] (one prefill).

    token_ids[:first] is the prompt: with fp16 weights its rows take the prompt kernel and
    the continuation's rows the fp16 one, as when serving.
    """
    from app.model.linear import RowKinds
    from tests.model.helpers import Chunk, NaiveBlockAllocator, model_logits

    allocator = NaiveBlockAllocator(runner.num_blocks, runner.block_size)
    table: list[int] = []
    allocator.reserve(table, len(token_ids))
    kinds = None
    if runner.splits_rows:
        is_prompt = [True] * first + [False] * (len(token_ids) - first)
        kinds = RowKinds.from_flags(is_prompt, runner.device)
    chunk = Chunk(token_ids, 0, table)
    (logits,) = model_logits(runner.model, runner.kv_cache, [chunk], kinds)
    return logits[first - 1 : -1]


def perplexity(runner, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of token_ids[1:], each given the ones before it
    (one prefill; the first token is the prompt, the others take the generation rows'
    kernels, as argmax_along's continuation does)."""
    logits = logits_along(runner, token_ids, 1)  # [len - 1, vocab]: predicts tokens 1..
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(token_ids[1:])
    nll = -log_probs[torch.arange(len(targets)), targets].mean()
    return math.exp(float(nll))


def measure(model_dir, weight_dtypes: list[str], num_new: int) -> list[Agreement]:
    tokenizer = Tokenizer(model_dir)
    prompts = prompt_set(tokenizer)
    passage = tokenizer.encode(PASSAGE)
    reference_runner, settings = runner_for(model_dir, "float32")
    reference = greedy(reference_runner, settings, tokenizer, prompts, num_new)
    fp32_perplexity = perplexity(reference_runner, passage)
    del reference_runner
    results = []
    for weight_dtype in weight_dtypes:
        runner, settings = runner_for(model_dir, weight_dtype)
        agree = total = 0
        prefixes = []  # per prompt: tokens this dtype's greedy run shares with fp32's
        for prompt, continuation in zip(prompts, reference):
            choices = argmax_along(runner, prompt + continuation, len(prompt))
            agree += sum(a == b for a, b in zip(choices, continuation))
            total += len(continuation)
            prefixes.append(first_divergence(choices, continuation))
        results.append(
            Agreement(
                weight_dtype=weight_dtype,
                teacher_forced_top1=agree / total,
                exact_greedy_match=sum(p == num_new for p in prefixes) / len(prompts),
                mean_tokens_before_divergence=statistics.mean(prefixes),
                num_prompts=len(prompts),
                num_new_tokens=num_new,
                matmuls=matmul_kernels(runner),
                perplexity=perplexity(runner, passage),
                fp32_perplexity=fp32_perplexity,
            )
        )
    return results


def first_divergence(choices: list[int], continuation: list[int]) -> int:
    """How many tokens a greedy run shares with `continuation`, from the teacher-forced
    argmax `choices` along it: up to the first position where they differ (the greedy
    run saw the same prefix there, so it chose the same token), all of them otherwise."""
    return next(
        (i for i, (a, b) in enumerate(zip(choices, continuation)) if a != b), len(continuation)
    )


def main() -> None:
    from app.weights import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--weight-dtypes", default="float16,bfloat16,int8,int4")
    args = parser.parse_args()
    torch.manual_seed(0)
    for result in measure(default_model_dir(), args.weight_dtypes.split(","), args.new_tokens):
        print(
            f"{result.weight_dtype}: teacher-forced top-1 agreement "
            f"{result.teacher_forced_top1:.1%}, exact greedy match "
            f"{result.exact_greedy_match:.0%} of {result.num_prompts} prompts, "
            f"{result.mean_tokens_before_divergence:.1f} of {result.num_new_tokens} tokens "
            f"before the first divergence; perplexity of the passage {result.perplexity:.3f} "
            f"(fp32 {result.fp32_perplexity:.3f}); matmuls: {result.matmuls}"
        )


if __name__ == "__main__":
    main()
