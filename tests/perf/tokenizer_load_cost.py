"""CPU cost of loading the tokenizer in a fresh process, the two ways AutoTokenizer can
learn the model's type (docs/testing.md, "2026-12-04"):

- `autoconfig`: AutoTokenizer loads the config itself (AutoConfig, which imports the
  model's config class and, in transformers 5, torch.distributed.tensor and sympy);
- `plain`: lamina's `tokenizer_choice_config`, config.json as a plain PretrainedConfig.

    python -m tests.perf.tokenizer_load_cost [--model DIR] [--repeats 5]

Each sample is a new Python process that imports torch first (as a server has) and then
times, in CPU seconds, the import of transformers' AutoTokenizer and the load; the two
ways alternate, so a shared machine's load falls on both. Median and every sample.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

SAMPLE = """
import sys, time
from pathlib import Path
import torch
started = time.process_time()
from transformers import AutoTokenizer
from app.tokenizer import tokenizer_choice_config
path = sys.argv[1]
config = tokenizer_choice_config(Path(path)) if sys.argv[2] == "plain" else None
AutoTokenizer.from_pretrained(path, local_files_only=True, config=config)
print(time.process_time() - started)
"""
WAYS = ("autoconfig", "plain")


def sample(model_dir: str, way: str) -> float:
    """CPU seconds of one fresh process's tokenizer load."""
    done = subprocess.run(
        [sys.executable, "-c", SAMPLE, model_dir, way], capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


def main() -> None:
    from app.weights import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            samples[way].append(sample(args.model, way))
    for way, seconds in samples.items():
        every = " ".join(f"{s:.2f}" for s in seconds)
        print(f"{way}: median {statistics.median(seconds):.2f} s of CPU ({every})")


if __name__ == "__main__":
    main()
