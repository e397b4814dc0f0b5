"""`lamina bench perplexity`: lamina's perplexity beside llama.cpp's, precision by precision.

Quantized weights cost some quality; this measures how much, for lamina and for
llama.cpp on the same model and the same tokens. llama.cpp's `llama-perplexity` (built
once from the same sources as `lamina bench peers`' server, cached) reads the text,
cuts its tokens into chunks of `--ctx` and scores the second half of each chunk (every
token there predicted from at least ctx/2 before it). lamina scores exactly those
tokens: the chunk token ids are read back from the file `llama-perplexity` writes with
`--kl-divergence-base`, each chunk goes through lamina's engine as a prompt with
`prompt_logprobs` (the path a client's scoring request takes), and the same positions
are averaged. Precisions pair LAMINA_WEIGHT_DTYPE with a GGUF type as in the peers
bench (fp32/F32, fp16/F16, bf16/BF16, int8/Q8_0, int4/Q4_0, int4-q4_1/Q4_1,
int4-q4_k_m/Q4_K_M).

Writes JSON and prints a markdown table. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from app.bench.corpus import PASSAGE
from app.bench.out_file import add_json_out
from app.bench.peers import model_folder
from app.bench.peers_build import (
    LLAMA_CPP_PYTHON_VERSION,
    PERPLEXITY,
    LlamaCpp,
    find_or_build,
)
from app.bench.peers_gguf import ensure_gguf, gguf_dir, model_content_hash
from app.bench.peers_servers import Precision, parse_precisions

FINAL_ESTIMATE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


@dataclass(frozen=True)
class Chunks:
    """The token ids llama.cpp scored: `n_chunk` chunks of `n_ctx` tokens each."""

    n_ctx: int
    tokens: list[list[int]]  # [n_chunk][n_ctx]

    @property
    def first(self) -> int:
        """Positions after this one are scored in each chunk (llama-perplexity's rule)."""
        return self.n_ctx // 2


@dataclass(frozen=True)
class Row:
    precision: str
    gguf_type: str
    lamina: float
    llama_cpp: float
    llama_cpp_error: float  # llama-perplexity's own +/- estimate
    scored_tokens: int


def read_chunks(logits_file: Path) -> Chunks:
    """The header of llama-perplexity's `--kl-divergence-base` file: "_logits_", n_ctx,
    n_vocab, n_chunk (int32 each), then n_chunk * n_ctx int32 token ids."""
    with logits_file.open("rb") as handle:
        if handle.read(8) != b"_logits_":
            raise ValueError(f"{logits_file}: not a llama-perplexity logits file")
        n_ctx, _n_vocab, n_chunk = struct.unpack("<3i", handle.read(12))
        flat = struct.unpack(f"<{n_chunk * n_ctx}i", handle.read(4 * n_chunk * n_ctx))
    return Chunks(n_ctx, [list(flat[i * n_ctx : (i + 1) * n_ctx]) for i in range(n_chunk)])


def llama_cpp_perplexity(
    binary: Path, gguf: Path, text_file: Path, ctx: int, threads: int, logits_out: Path
) -> tuple[float, float]:
    """llama-perplexity's final estimate and its +/- (and the chunk tokens in logits_out)."""
    command = [
        str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "-b", str(ctx),
        "-t", str(threads), "--kl-divergence-base", str(logits_out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    match = FINAL_ESTIMATE.search(done.stdout + done.stderr)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return float(match.group(1)), float(match.group(2))


def scored_logprobs(prompt_logprobs, first: int) -> list[float]:
    """The log-probabilities of a chunk's tokens after position `first` (each given all
    the chunk's tokens before it), from the engine's per-prompt-token entries."""
    return [entry.logprob for entry in prompt_logprobs[first + 1 :]]


def lamina_perplexity(folder: Path, weight_dtype: str, chunks: Chunks, threads: int) -> float:
    """exp(mean NLL) of the scored positions, every chunk a prompt with prompt_logprobs."""
    from app.config import load_settings
    from app.core import SamplingParams
    from app.engine.engine_core import EngineCore
    from app.model.runner import ModelRunner
    from app.tokenizer import Tokenizer

    settings = load_settings(
        model=folder,
        weight_dtype=weight_dtype,
        num_threads=threads,
        enable_prefix_caching=False,  # each chunk computed from its own tokens only
    )
    core = EngineCore(ModelRunner.from_settings(settings), Tokenizer(folder), settings)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    scored: dict[str, list[float]] = {}
    for index, tokens in enumerate(chunks.tokens):
        for delta in core.add_request(f"chunk-{index}", tokens, params):
            raise RuntimeError(f"chunk {index} refused: {delta.error}")
    while core.has_unfinished():
        for delta in core.step():
            if delta.error:
                raise RuntimeError(f"{delta.request_id}: {delta.error}")
            if delta.prompt_logprobs:
                scored[delta.request_id] = scored_logprobs(delta.prompt_logprobs, chunks.first)
    logprobs = [value for key in sorted(scored) for value in scored[key]]
    return math.exp(-sum(logprobs) / len(logprobs))


def measure(
    args, folder: Path, precision: Precision, llama: LlamaCpp, ggufs: Path, text: Path
) -> Row:
    """Both perplexities in one precision, on the tokens llama.cpp chunked (`ggufs`: the
    folder of the model's cached GGUF conversions)."""
    gguf = ensure_gguf(llama, folder, precision.gguf_type, ggufs)
    binary = llama.server.parent / PERPLEXITY
    with tempfile.TemporaryDirectory() as tmp:
        logits = Path(tmp) / "base.kld"
        ppl, error = llama_cpp_perplexity(binary, gguf, text, args.ctx, args.threads, logits)
        chunks = read_chunks(logits)
    ours = lamina_perplexity(folder, precision.lamina_weight_dtype, chunks, args.threads)
    scored = len(chunks.tokens) * (chunks.n_ctx - chunks.first - 1)
    return Row(precision.name, precision.gguf_type, ours, ppl, error, scored)


def markdown(rows: list[Row]) -> str:
    lines = [
        "| precision | lamina | llama.cpp | GGUF |",
        "|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.precision} | {row.lamina:.3f} | {row.llama_cpp:.3f} "
            f"(+/- {row.llama_cpp_error:.3f}) | {row.gguf_type} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lamina bench perplexity", description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: LAMINA_MODEL's)")
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--ctx", type=int, default=256, help="chunk length (tokens)")
    parser.add_argument("--text", type=Path, help="a UTF-8 text file (default: a fixed passage)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp-version", default=LLAMA_CPP_PYTHON_VERSION)
    add_json_out(parser, Path("bench_results/perplexity.json"))
    args = parser.parse_args(argv)
    args.precision_list = parse_precisions(args.precisions)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    folder = model_folder(args)
    llama = find_or_build(args.llama_cpp_version, extra=(PERPLEXITY,))
    ggufs = gguf_dir(folder, model_content_hash(folder))
    with tempfile.TemporaryDirectory() as tmp:
        text = args.text or Path(tmp) / "passage.txt"
        if args.text is None:
            text.write_text(PASSAGE)
        rows = [measure(args, folder, p, llama, ggufs, text) for p in args.precision_list]
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": str(folder),
        "ctx": args.ctx,
        "text": str(args.text) if args.text else "app/bench/corpus.py PASSAGE",
        "llama_cpp_version": args.llama_cpp_version,
        "rows": [asdict(row) for row in rows],
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[perplexity] wrote {args.out}")
    return 0
