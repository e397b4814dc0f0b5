"""The servers `lamina bench peers` compares, each in one precision, started one at a time.

A precision pairs lamina's LAMINA_WEIGHT_DTYPE with the GGUF type llama.cpp serves in
it. Both servers get the same threads; llama-server gets one slot per stream
(`-np`), continuous batching, and a context of `CONTEXT_PER_SLOT` tokens per slot.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.bench.spawn import free_port, stop_process, wait_until_answering


@dataclass(frozen=True)
class Precision:
    name: str  # the --precisions name
    lamina_weight_dtype: str  # LAMINA_WEIGHT_DTYPE
    gguf_type: str  # the llama.cpp file type it is compared with


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", "float32", "F32"),
        Precision("fp16", "float16", "F16"),
        Precision("bf16", "bfloat16", "BF16"),
        Precision("int8", "int8", "Q8_0"),
        Precision("int4", "int4", "Q4_0"),
        # int4 keeps a minimum per block like Q4_1 (Q4_0 is symmetric): the like-for-like
        # 4-bit pair, beside the Q4_0 that llama.cpp's users mostly run.
        Precision("int4-q4_1", "int4", "Q4_1"),
        # Ollama's default 4-bit file: Q4_K blocks, some projections in Q6_K (Q5_0 and
        # Q8_0 where rows are no whole 256-weight superblocks, as the default model's
        # 576). With --lamina-gguf lamina serves that very file: its Q4_K blocks as they
        # are, the wider projections and the head in int8 blocks.
        Precision("int4-q4_k_m", "int4", "Q4_K_M"),
    )
}

# 64-word prompts are about 80-100 tokens; 64 new tokens; room to spare.
CONTEXT_PER_SLOT = 512

# Series names: lamina on the model folder, llama.cpp, lamina on llama.cpp's file, and
# lamina with prompt-lookup speculative decoding (the repetitive workload).
LAMINA, LLAMA_CPP, LAMINA_GGUF, LAMINA_SPEC = "lamina", "llama.cpp", "lamina-gguf", "lamina-spec"
SPECULATION_ON = {"LAMINA_SPECULATIVE": "ngram"}


def parse_precisions(text: str) -> list[Precision]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown or not names:
        raise ValueError(
            f"--precisions: unknown {unknown or text!r}; choose from {list(PRECISIONS)}"
        )
    return [PRECISIONS[n] for n in names]


def lamina_env(precision: Precision, threads: int, model: Path, extra: dict | None = None) -> dict:
    """LAMINA_* settings of the lamina series in `precision` (model: folder or .gguf).
    The precision's weight storage on a GGUF file too, named rather than left to `auto`
    (which picks the same for each pair's file today), so that what a pair compares
    does not move when `auto`'s rules do."""
    return {
        "LAMINA_MODEL": str(model),
        "LAMINA_WEIGHT_DTYPE": precision.lamina_weight_dtype,
        "LAMINA_NUM_THREADS": str(threads),
        **(extra or {}),
    }


# llama-server's weight repacking off (its default is on: ggml's AMX and repacked CPU
# buffers). Only where a server with the default crashed at load (llama-server 0.3.36's
# copy with Q8_0 on a Xeon with AMX: SIGSEGV); the bench records it.
NO_REPACK = ("--no-repack",)


def llama_server_command(
    server: Path, gguf: Path, port: int, streams: int, threads: int, extra: tuple[str, ...] = ()
) -> list[str]:
    """llama-server with one slot per stream and the same threads as lamina."""
    return [
        str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(streams), "-c", str(streams * CONTEXT_PER_SLOT),
        "-t", str(threads), "-tb", str(threads), "--cont-batching", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def llama_server(
    server: Path,
    gguf: Path,
    streams: int,
    threads: int,
    log_path: Path,
    extra: tuple[str, ...] = (),
) -> Iterator[str]:
    """A llama-server on a free loopback port until the block ends; its log to `log_path`.
    Raises ServerExited if it exits before answering."""
    port = free_port()
    command = llama_server_command(server, gguf, port, streams, threads, extra)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", process, "llama-server", timeout_s=180)
        yield url
    finally:
        stop_process(process, timeout_s=30)
