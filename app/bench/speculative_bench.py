"""`lamina bench engine --workload repetitive --speculative off,ngram,draft`: speculative
decoding against none, on a workload where prompt lookup helps (`--workload chat`:
ordinary questions, where it has little to find; `--workload random`: random token
prompts). `draft` loads `--speculative-model` (weights stored as
`--speculative-weight-dtype`) beside the served model.

Every mode runs on the same loaded model in this one process, alternating at each
level `--repeats` times, so their ratios come from the same minutes of a shared
machine. Greedy, EOS honoured, at most `--output-len` tokens per request. The outputs of
every mode must equal the first mode's token for token: the run says so, per level.
Reported per mode: tokens/s (median of the repeats), the median of the per-repeat
ratios to the first mode, draft tokens accepted and tokens per verify step, and the
load average around the level (the machine is shared).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass

from app.bench.chat_questions import chat_messages
from app.bench.closed_loop import closed_loop, make_prompts
from app.bench.repetitive import repetitive_messages
from app.core import SamplingParams


@dataclass
class ModeResult:
    concurrency: int
    mode: str
    num_requests: int
    output_tokens: int
    tok_s: list[float]  # one per repeat, in run order
    ratio_to_first: float | None  # median over repeats of tok_s / first mode's tok_s
    acceptance: float | None  # draft tokens accepted / drafted
    tokens_per_verify: float | None  # 1 + accepted / verify steps
    identical_to_first: bool
    load_average: tuple[float, float]  # 1-minute load before and after the level


def main(args, engine, tokenizer) -> int:
    modes = (args.speculative or "off,ngram").split(",")
    num_prompts = max(args.num_prompts, max(args.levels))
    if args.workload in ("repetitive", "chat"):
        make = repetitive_messages if args.workload == "repetitive" else chat_messages
        prompts = [tokenizer.apply_chat_template(messages) for messages in make(num_prompts)]
    else:  # where prompt lookup has little to find: what speculation costs
        prompts = make_prompts(tokenizer.vocab_size, num_prompts, args.prompt_len, args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0)
    if "draft" in modes:
        _load_draft(args, engine)
    print(_header(engine, args, prompts, modes), flush=True)
    results: list[ModeResult] = []
    for level in args.levels:
        results += _run_level(args, engine, tokenizer, prompts[: max(level, 4)], params, level)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


def _draft_settings(args, settings):
    """The engine's settings with the draft model of the command line."""
    update = {"speculative_model": args.speculative_model}
    update["speculative_weight_dtype"] = args.speculative_weight_dtype
    return settings.model_copy(update=update)


def _load_draft(args, engine) -> None:
    if args.speculative_model is None:
        raise SystemExit("--speculative draft needs --speculative-model")
    runner = engine.runner
    runner.draft_runner = runner.build_draft_runner(_draft_settings(args, engine.settings))
    runner.draft_runner.warmup()


def _run_level(args, engine, tokenizer, prompts, params, level) -> list[ModeResult]:
    from app.engine.engine_core import EngineCore

    modes = (args.speculative or "off,ngram").split(",")
    load_before = os.getloadavg()[0]
    cores = {}
    for mode in modes:
        update = {"speculative": mode}
        if args.speculative_max_batch is not None:
            update["speculative_max_batch"] = args.speculative_max_batch
        settings = engine.settings.model_copy(update=update)
        if mode == "draft":
            settings = _draft_settings(args, settings)
        cores[mode] = EngineCore(engine.runner, tokenizer, settings)
        warm = SamplingParams(max_tokens=4, temperature=0.0)
        closed_loop(cores[mode], prompts[:level], warm, level, "warm")  # this shape
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    outputs: dict[str, dict[int, list[int]]] = {}
    tokens: dict[str, int] = {}
    for repeat in range(args.repeats):
        for mode, core in cores.items():
            got: dict[int, list[int]] = {}
            num_tokens, seconds = closed_loop(core, prompts, params, level, f"r{repeat}", got)
            rates[mode].append(num_tokens / seconds)
            outputs.setdefault(mode, got)
            tokens[mode] = num_tokens
    load_after = os.getloadavg()[0]
    first = modes[0]
    results = []
    for mode, core in cores.items():
        ratios = [rate / base for rate, base in zip(rates[mode], rates[first])]
        stats = core.stats().speculation
        result = ModeResult(
            concurrency=level,
            mode=mode,
            num_requests=len(prompts),
            output_tokens=tokens[mode],
            tok_s=[round(rate, 2) for rate in rates[mode]],
            ratio_to_first=statistics.median(ratios) if mode != first else None,
            acceptance=stats.num_accepted_tokens / stats.num_draft_tokens
            if stats and stats.num_draft_tokens
            else None,
            tokens_per_verify=1 + stats.num_accepted_tokens / stats.num_drafts
            if stats and stats.num_drafts
            else None,
            identical_to_first=outputs[mode] == outputs[first],
            load_average=(load_before, load_after),
        )
        results.append(result)
        print(_row(result), flush=True)
    return results


def _header(engine, args, prompts, modes) -> str:
    lengths = sorted(len(p) for p in prompts)
    workload = {
        "repetitive": "rewrite a passage fixing typos",
        "chat": "ordinary chat questions",
    }.get(args.workload, "random")
    draft = ""
    if "draft" in modes:
        draft = f"; draft {args.speculative_model}, {args.speculative_weight_dtype} weights"
    return (
        f"# speculative decoding: {', '.join(modes)}; {workload} prompts, "
        f"{lengths[0]}-{lengths[-1]} tokens, "
        f"at most {args.output_len} new tokens, greedy; {args.repeats} repeats alternating; "
        f"weights {engine.weight_dtype}, {engine.runner.kernel_summary()['matmul']}{draft}\n"
        "| streams | mode | requests | tokens | tok/s (median) | ratio | accepted | "
        "tokens/verify | identical | load 1m |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"
    )


def _row(r: ModeResult) -> str:
    ratio = f"{r.ratio_to_first:.2f}" if r.ratio_to_first is not None else "1"
    accepted = f"{r.acceptance:.0%}" if r.acceptance is not None else "-"
    per_verify = f"{r.tokens_per_verify:.2f}" if r.tokens_per_verify is not None else "-"
    load = f"{r.load_average[0]:.1f}-{r.load_average[1]:.1f}"
    return (
        f"| {r.concurrency} | {r.mode} | {r.num_requests} | {r.output_tokens} | "
        f"{statistics.median(r.tok_s):.1f} | {ratio} | {accepted} | {per_verify} | "
        f"{'yes' if r.identical_to_first else 'NO'} | {load} |"
    )
