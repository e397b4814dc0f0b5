"""How far lamina's stored weights are from a quantized GGUF file's own values, per
storage, and how far the file's values are from the fp32 weights it was made from.

Run: `.venv/bin/python -m tests.perf.gguf_requant_error`

A 2-layer random LLaMA (hidden 256, intermediate 256) is written as GGUF with each
quant type (the `gguf` package's quantizer, the projections only), loaded back, and
every projection compared: relative RMS of (what the kernels multiply by - the file's
dequantized value), and of (the file's value - the original fp32 weight).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from app.model import gguf_folder
from app.model.linear import Linear
from app.model.loader import load_model
from app.native.panels import INT4, dequantize_int4, dequantize_int8
from app.weights import default_model_dir
from app.weights_source import resolve_model_folder
from tests.model.gguf_writer import write_gguf
from tests.model.helpers import save_random_model

STORAGES = {"int8": (torch.int8, dequantize_int8), "int4": (INT4, dequantize_int4)}
CASES = [("Q8_0", "int8"), ("Q4_1", "int4"), ("Q4_0", "int8"), ("Q4_0", "int4")]


def relative_rms(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float((error.pow(2).mean() / reference.pow(2).mean()).sqrt())


def projections(model) -> dict[str, Linear]:
    return {n: m for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, Linear)}


def main() -> None:
    root = Path(tempfile.mkdtemp())
    gguf_folder.gguf_cache_dir = lambda: root / "cache"
    folder = save_random_model(
        root / "model", "LlamaConfig", seed=3, vocab_size=1024, num_hidden_layers=2,
        hidden_size=256, intermediate_size=256, max_position_embeddings=512,
        tie_word_embeddings=False,
    )  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((default_model_dir() / name).read_bytes())
    original = projections(load_model(folder, kernels="reference"))
    for quant, storage in CASES:
        served = resolve_model_folder(
            write_gguf(folder, root / f"{quant}.gguf", num_tokens=1024, quant=quant)
        )
        file_values = projections(load_model(served, kernels="reference"))
        weight_dtype, dequantize = STORAGES[storage]
        stored = projections(load_model(served, weight_dtype=weight_dtype))
        file_error, stored_error = [], []
        for name, linear in file_values.items():
            weight = linear.weight
            kernel_weight = dequantize(stored[name].kernel.panels, weight.shape[0])
            stored_error.append(relative_rms(kernel_weight - weight, weight))
            file_error.append(relative_rms(weight - original[name].weight, original[name].weight))
        print(
            f"{quant} as {storage}: file vs fp32 {100 * sum(file_error) / len(file_error):.2f} %"
            f" RMS; stored vs file {100 * sum(stored_error) / len(stored_error):.2f} % RMS"
        )


if __name__ == "__main__":
    main()
