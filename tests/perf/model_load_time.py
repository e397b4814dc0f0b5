"""Start-up cost of the default model served three ways, alternating in one process
(docs/gguf-and-hub-models.md):

- `folder`: the converted fp32 safetensors folder (model_weights/smollm2-135m-instruct);
- `gguf`: the Q4_1 GGUF file, its folder already in the cache (every start after the first);
- `gguf-cold`: the same file with an empty cache (the first start: metadata, tokenizer).

    python -m tests.perf.model_load_time [--repeats 3]

Each sample is load_engine without warm-up (model resolution, config, both tokenizers,
weights, KV cache, grammar tokenizer): what a server does before it is ready, but the
warm-up step, which is the same for all three. Wall seconds; median and spread of the
repeats, the three interleaved so a shared machine's load falls on all of them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from app.config import Settings
from app.main import load_engine
from app.model import gguf_folder
from app.weights import default_gguf_path, default_model_dir


def _load_seconds(model: Path) -> float:
    settings = Settings(model=model, device="cpu", kv_cache_gb=0.05, warmup=False)
    started = time.perf_counter()
    loaded = load_engine(settings)
    seconds = time.perf_counter() - started
    del loaded
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder, gguf = default_model_dir(), default_gguf_path()
    _load_seconds(gguf)  # the warm cache for `gguf`, and first-import costs for all
    samples: dict[str, list[float]] = {"folder": [], "gguf": [], "gguf-cold": []}
    warm_cache = gguf_folder.gguf_cache_dir()
    for _ in range(args.repeats):
        samples["folder"].append(_load_seconds(folder))
        samples["gguf"].append(_load_seconds(gguf))
        with tempfile.TemporaryDirectory() as cold:
            gguf_folder.gguf_cache_dir = lambda cold=cold: Path(cold)
            samples["gguf-cold"].append(_load_seconds(gguf))
            gguf_folder.gguf_cache_dir = lambda: warm_cache
    base = statistics.median(samples["folder"])
    for name, seconds in samples.items():
        median = statistics.median(seconds)
        print(
            f"{name:10s} median {median:5.1f} s  (min {min(seconds):.1f}, max {max(seconds):.1f}) "
            f" {median / base:.2f}x the folder"
        )


if __name__ == "__main__":
    main()
