"""`lamina bench peers`: lamina against llama.cpp's `llama-server`, precision by precision.

Builds (once, cached) or takes (`--llama-server`) llama.cpp's server, converts the
served model to GGUF in each precision (cached), then runs the same closed-loop
workload (streaming completions of 64-word prompts, 64 new tokens, ignore_eos) against
lamina and llama.cpp, one server at a time, at each `--streams` level, for `--rounds`
rounds, the order of the servers alternating from round to round. Precisions pair
LAMINA_WEIGHT_DTYPE with a GGUF type: fp32/F32, fp16/F16, bf16/BF16, int8/Q8_0,
int4/Q4_0, int4-q4_1/Q4_1, int4-q4_k_m/Q4_K_M. `--lamina-gguf` adds lamina serving
llama.cpp's own file, its weights stored in the precision's LAMINA_WEIGHT_DTYPE.
`--workload repetitive` runs prompts that ask to repeat a document, where prompt
lookup helps.

Writes JSON (every sample, medians, ratios, the machine, load averages), a markdown
table of medians and lamina / llama.cpp ratios, and a PNG. A benchmark, not a test:
the machine's other load shows in the load averages it records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from app.bench import peers_report as report
from app.bench.out_file import add_json_out
from app.bench.peers_build import LLAMA_CPP_PYTHON_VERSION, find_or_build, given_server
from app.bench.peers_gguf import ensure_gguf, gguf_dir, model_content_hash
from app.bench.peers_servers import (
    LAMINA,
    LAMINA_GGUF,
    LAMINA_SPEC,
    LLAMA_CPP,
    NO_REPACK,
    SPECULATION_ON,
    Precision,
    lamina_env,
    llama_server,
    parse_precisions,
)
from app.bench.peers_workload import (
    MAX_TOKENS,
    chat_body,
    completion_body,
    repetitive_chats,
    run_level,
    served_model,
    word_prompts,
)
from app.bench.spawn import ServerExited, spawned_server

QUICK = {"rounds": 1, "streams": "1,8", "requests_per_stream": 1}
DEFAULTS = {"rounds": 2, "streams": "1,8,32", "requests_per_stream": 2}
REPETITIVE_MAX_TOKENS = 256  # most of a corrected passage: long enough for lookup to pay


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lamina bench peers", description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: LAMINA_MODEL's)")
    parser.add_argument("--precisions", default="fp32,fp16,int8,int4")
    parser.add_argument("--streams", help=f"levels (default {DEFAULTS['streams']})")
    parser.add_argument("--rounds", type=int, help=f"default {DEFAULTS['rounds']}")
    parser.add_argument(
        "--requests-per-stream",
        type=int,
        help=f"requests each client sends per level (default {DEFAULTS['requests_per_stream']}; "
        "a level sends at least 4)",
    )
    parser.add_argument(
        "--max-tokens", type=int, help=f"default {MAX_TOKENS}, {REPETITIVE_MAX_TOKENS} repetitive"
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workload", choices=["random", "repetitive"], default="random")
    parser.add_argument("--lamina-gguf", action="store_true", help="add lamina on the GGUF file")
    parser.add_argument("--llama-server", type=Path, help="an existing llama-server binary")
    parser.add_argument("--llama-cpp-version", default=LLAMA_CPP_PYTHON_VERSION)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    add_json_out(parser, Path("bench_results/peers.json"))
    args = parser.parse_args(argv)
    for name, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.max_tokens is None:
        args.max_tokens = REPETITIVE_MAX_TOKENS if args.workload == "repetitive" else MAX_TOKENS
    args.precision_list = parse_precisions(args.precisions)
    args.stream_levels = [int(n) for n in args.streams.split(",") if n.strip()]
    if not args.stream_levels or min(args.stream_levels) < 1 or args.rounds < 1:
        parser.error("--streams and --rounds must be positive")
    return args


def model_folder(args: argparse.Namespace) -> Path:
    from app.config import load_settings

    folder = args.model or load_settings().model
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder}: not a model folder (the GGUF converter needs one)")
    return folder.resolve()


def series_order(series: list[str], round_index: int) -> list[str]:
    """Servers in the given order in even rounds, reversed in odd ones."""
    return list(series) if round_index % 2 == 0 else list(reversed(series))


def level_bodies(args, model: str, round_index: int, streams: int) -> list[dict]:
    """The same requests for every server of a round at this level."""
    count = max(4, streams * args.requests_per_stream)
    seed = 1000 * round_index + streams
    if args.workload == "repetitive":
        return [chat_body(model, chat, args.max_tokens) for chat in repetitive_chats(count, seed)]
    return [completion_body(model, p, args.max_tokens) for p in word_prompts(count, seed)]


def measure_cell(url, model, series, precision, round_index, streams, args):
    """One level on one running server: a Sample, and the texts in request order."""
    bodies = level_bodies(args, model, round_index, streams)
    load_before = [round(x, 2) for x in os.getloadavg()]
    summary, records = asyncio.run(run_level(url, streams, bodies))
    sample = report.Sample(
        round=round_index,
        series=series,
        precision=precision.name,
        streams=streams,
        output_tok_s=round(summary.output_tok_s, 2),
        num_errors=summary.num_errors,
        num_short=sum(1 for r in records if r.ok and r.output_tokens < args.max_tokens),
        load_before=load_before,
        load_after=[round(x, 2) for x in os.getloadavg()],
        summary=asdict(summary),
    )
    print(
        f"[peers] round {round_index} {series:>12} {precision.name:>5} {streams:>3} streams: "
        f"{sample.output_tok_s:8.1f} tok/s, {sample.num_errors} errors, load "
        f"{sample.load_before[0]}->{sample.load_after[0]}",
        flush=True,
    )
    return sample, [r.text for r in records]


def warm_up(url: str, model: str) -> None:
    """One short request, so no level pays for a cold start."""
    # A seed no level uses (random.Random(-n) is Random(n)): no level finds it cached.
    body = completion_body(model, " ".join(word_prompts(1, seed="warm-up")), 4)
    asyncio.run(run_level(url, 1, [body]))


def run_lamina(series, precision, round_index, args, env, texts: dict) -> list[report.Sample]:
    """One lamina server through every level; its outputs go into `texts`."""
    samples = []
    with spawned_server("lamina", env) as url:
        model = served_model(url)
        warm_up(url, model)
        for streams in args.stream_levels:
            sample, outputs = measure_cell(
                url, model, series, precision, round_index, streams, args
            )
            samples.append(sample)
            texts[(series, round_index, precision.name, streams)] = outputs
    return samples


def run_llama_cpp(precision, round_index, args, llama, gguf: Path) -> list[report.Sample]:
    """One llama-server per level: `-np` is the level's number of streams."""
    samples = []
    for streams in args.stream_levels:
        with contextlib.ExitStack() as stack:
            url = enter_llama_server(stack, precision, streams, args, llama, gguf)
            model = served_model(url)
            warm_up(url, model)
            samples.append(
                measure_cell(url, model, LLAMA_CPP, precision, round_index, streams, args)[0]
            )
    return samples


def enter_llama_server(stack, precision, streams: int, args, llama, gguf: Path) -> str:
    """A llama-server for `precision` in `stack`, its URL. One that crashes at load with
    its defaults is started again with NO_REPACK, for this precision from then on, and
    `llama.flags_changed` says so (the JSON and the table carry it)."""
    log_path = args.out.parent / "peers_logs" / f"llama-server-{precision.name}.log"
    start = partial(llama_server, llama.server, gguf, streams, args.threads, log_path)
    if precision.name not in llama.flags_changed:
        try:
            return stack.enter_context(start())
        except ServerExited as crash:
            why = f"{crash} with its defaults; run with {' '.join(NO_REPACK)}"
            llama.flags_changed[precision.name] = why
            print(f"[peers] llama.cpp {precision.name}: {why}", flush=True)
    return stack.enter_context(start(NO_REPACK))


def lamina_series(args) -> list[str]:
    series = [LAMINA]
    if args.lamina_gguf:
        series.append(LAMINA_GGUF)
    if args.workload == "repetitive":
        series.append(LAMINA_SPEC)
    return series


def run_round(round_index, precision: Precision, args, llama, ggufs, folder, texts) -> list:
    """Every series once in `precision`, in this round's order."""
    samples = []
    series = [*lamina_series(args), LLAMA_CPP]
    for name in series_order(series, round_index):
        if name == LLAMA_CPP:
            samples += run_llama_cpp(precision, round_index, args, llama, ggufs[precision.name])
            continue
        model = ggufs[precision.name] if name == LAMINA_GGUF else folder
        extra = SPECULATION_ON if name == LAMINA_SPEC else None
        env = lamina_env(precision, args.threads, model, extra)
        samples += run_lamina(name, precision, round_index, args, env, texts)
    return samples


def speculation_identical(texts: dict) -> dict | None:
    """Greedy outputs with speculation on against off, request by request: how many
    were identical (None when the run had no speculative series)."""
    pairs = [
        (outputs, texts.get((LAMINA, *cell)))
        for (series, *cell), outputs in texts.items()
        if series == LAMINA_SPEC
    ]
    pairs = [(on, off) for on, off in pairs if off is not None]
    if not pairs:
        return None
    same = sum(a == b for on, off in pairs for a, b in zip(on, off, strict=True))
    return {"requests": sum(len(on) for on, _ in pairs), "identical": same}


def prepare(args, folder: Path):
    """llama.cpp's binaries and the model's GGUF file in every precision asked for."""
    if args.llama_server:
        llama = given_server(args.llama_server, args.llama_cpp_version)
    else:
        llama = find_or_build(args.llama_cpp_version)
    into = gguf_dir(folder, model_content_hash(folder))
    ggufs = {p.name: ensure_gguf(llama, folder, p.gguf_type, into) for p in args.precision_list}
    return llama, ggufs


def _commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() or "unknown"


def write_outputs(args, samples, series, llama, ggufs, started: str, texts: dict, final=True):
    """JSON, markdown and PNG of the samples so far (rewritten after every precision of
    every round, so a run cut short keeps what it measured); the table once, at the end."""
    med = report.medians(samples)
    lamina_ratios = report.ratios(med)
    identical = speculation_identical(texts)
    summary_lines = report.ratio_lines(lamina_ratios) if args.workload == "random" else []
    summary_lines += report.speculation_lines(report.ratios(med, LAMINA_SPEC, LAMINA), identical)
    table = report.markdown_table(samples, series)
    for name, why in llama.flags_changed.items():
        table += f"\nllama.cpp {name}: {why}.\n"
    payload = {
        "benchmark": "lamina bench peers",
        "date": started,
        "commit": _commit(),
        "machine": report.machine(),
        "workload": args.workload,
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("precision_list", "out", "model")
        }
        | {"model": str(args.model) if args.model else None},
        "llama_cpp": {
            "version": llama.version,
            "server": str(llama.server),
            "flags_changed": llama.flags_changed,  # precision -> why
        },
        "gguf_files": {k: {"path": str(v), "bytes": v.stat().st_size} for k, v in ggufs.items()},
        "samples": [asdict(s) for s in samples],
        "medians": [
            {"series": k[0], "precision": k[1], "streams": k[2], "output_tok_s": round(v, 2)}
            for k, v in med.items()
        ],
        "lamina_over_llama_cpp": [
            {"precision": p, "streams": n, "ratio": round(r, 3)}
            for (p, n), r in lamina_ratios.items()
        ],
        "complete": final,
        "speculation_outputs": identical,
        "summary": summary_lines,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(table)
    report.write_png(samples, series, args.out.with_suffix(".png"))
    if not final:
        return
    print("\n" + table + "\n" + "\n".join(summary_lines))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    # A SIGTERM ends the run like Ctrl-C: the servers' `finally` blocks stop them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    folder = model_folder(args)
    llama, ggufs = prepare(args, folder)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    samples: list[report.Sample] = []
    texts: dict = {}  # (series, round, precision, streams) -> outputs in request order
    series = [*lamina_series(args), LLAMA_CPP]
    for round_index in range(args.rounds):
        for precision in args.precision_list:
            samples += run_round(round_index, precision, args, llama, ggufs, folder, texts)
            write_outputs(args, samples, series, llama, ggufs, started, texts, final=False)
    write_outputs(args, samples, series, llama, ggufs, started, texts)
    identical = speculation_identical(texts)
    differs = identical is not None and identical["identical"] < identical["requests"]
    return 1 if differs or any(s.num_errors or s.num_short for s in samples) else 0
