"""Memory of loading a model: the peak resident set while loading and what stays resident
once loaded, per weight storage (docs/load-memory.md, README "Memory").

    python -m tests.perf.load_memory [--baseline REV] [--big DIR] [--only WORD ...]
                                     [--repeats 3]

A row is the median of `--repeats` fresh processes (the peak moves by up to ~170 MiB
from one process to the next) that only load the model, as the server does on the CPU
(malloc keeps freed memory, torch's threads set before loading, the heap trimmed once
loaded; no tokenizer, no KV cache). Each reports its peak RSS (getrusage's ru_maxrss),
its peak anonymous RSS (sampled every 5 ms: the RSS less file pages, which the kernel can
drop and read again), its RSS once loaded, the bytes the model serves with (parameters +
packed panels) and load_model's wall time (a shared machine's times drift: compare the
columns of one run). Models: the default folder (fp32 safetensors), the default GGUF
file (Q4_1) and, with `--big DIR`, a random LLaMA of ~0.9B parameters saved in bf16
(written to DIR by transformers' from_config on first use; nothing is downloaded).
`--baseline REV` runs every row a second time on the code of git revision REV (exported
to a temporary folder), interleaved with the working tree's, so both come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# ~0.9B parameters: TinyLlama's shape with 16 layers and 8 kv heads, an untied head.
BIG_CONFIG = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

# Run in the child, with PYTHONPATH at the tree under test: load, then report (MiB).
CHILD = """
import gc, json, resource, sys, threading, time
from pathlib import Path
import torch
from app.model.host_memory import keep_freed_memory_in_heap, process_rss_bytes, release_freed_heap
from app.model.loader import load_model
from app.model.memory_report import _model_bytes
from app.native.panels import INT4

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

peak_anon = [0.0]
def sample_anon():  # the file maps' pages are left out: the kernel may drop them
    while True:
        peak_anon[0] = max(peak_anon[0], anon_mib())
        time.sleep(0.005)

threading.Thread(target=sample_anon, daemon=True).start()
model_path, weight_dtype = Path(sys.argv[1]), sys.argv[2]
keep_freed_memory_in_heap()
torch.set_num_threads(2)
if model_path.suffix == ".gguf":
    from app.model.gguf_folder import gguf_folder
    model_path = gguf_folder(model_path)
dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8, "int4": INT4}
started = time.perf_counter()
model = load_model(model_path, "cpu", torch.float32, weight_dtype=dtypes[weight_dtype])
seconds = time.perf_counter() - started
gc.collect()
release_freed_heap()
weights, packed, _ = _model_bytes(model, set())
print(json.dumps({
    "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_anon": peak_anon[0],
    "after": process_rss_bytes() / 2**20,
    "served": (weights + packed) / 2**20,
    "seconds": seconds,
}))
"""


def measure(tree: Path, model: Path, weight_dtype: str) -> dict[str, float]:
    """One fresh process loading `model` with the code of `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), weight_dtype],
        env=env, cwd=tree, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"loading {model} ({weight_dtype}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_revision(revision: str, into: Path) -> Path:
    """The tracked files of `revision` in `into` (model_weights/ is not tracked: models
    are passed by absolute path)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def big_model(folder: Path) -> Path:
    """A random ~0.9B-parameter LLaMA in bf16 safetensors, written once."""
    if not (folder / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**BIG_CONFIG)).to(torch.bfloat16)
        model.save_pretrained(folder)
    return folder


def cases(args) -> list[tuple[str, Path, str]]:
    from app.weights import default_gguf_path, default_model_dir

    folder, gguf = default_model_dir().resolve(), default_gguf_path()
    rows = [("smollm2-135m", folder, d) for d in ("float32", "bfloat16", "int8", "int4")]
    rows += [("smollm2-135m Q4_1.gguf", gguf, d) for d in ("int4", "int8")]
    if args.big:
        big = big_model(Path(args.big))
        storages = ("float32", "bfloat16", "int8", "int4")
        rows += [("random llama 0.9B bf16", big, d) for d in storages]
    if args.only:
        rows = [row for row in rows if any(word in f"{row[0]} {row[2]}" for word in args.only)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a git revision to measure beside the working tree")
    parser.add_argument("--big", help="folder of the random ~0.9B LLaMA (written if missing)")
    parser.add_argument("--only", nargs="*", help="rows whose model or storage has a word")
    parser.add_argument("--repeats", type=int, default=3, help="processes per row (medians)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lamina-baseline-") as tmp:
        trees = {"this tree": REPO}
        if args.baseline:
            trees = {args.baseline: export_revision(args.baseline, Path(tmp)), **trees}
        print(
            "| model | weights | code | peak RSS MiB | peak anonymous MiB | RSS loaded MiB "
            "| served MiB | load s |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for name, model, weight_dtype in cases(args):
            for label, tree in trees.items():
                runs = [measure(tree, model, weight_dtype) for _ in range(args.repeats)]
                got = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                print(
                    f"| {name} | {weight_dtype} | {label} | {got['peak']:,.0f} | "
                    f"{got['peak_anon']:,.0f} | "
                    f"{got['after']:,.0f} | {got['served']:,.0f} | {got['seconds']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
