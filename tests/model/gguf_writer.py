"""Write a Hugging Face folder (a tiny random model) as a GGUF file with the `gguf`
package, the way llama.cpp's convert_hf_to_gguf.py does for these architectures: F32
tensors under llama.cpp's names (the `gguf` package's own table, not lamina's), q/k
permuted for `llama`, the head dropped when it is tied, the BPE tokenizer and chat
template in `tokenizer.*` metadata. Only what the tests need; tests read it back with
lamina and compare with the folder."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np

GGUF_ARCH = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
_CONTROL, _NORMAL = 3, 1  # llama.cpp token types


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotary halves interleaved per head."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(
    folder: Path,
    out: Path,
    arch: str = "llama",
    num_tokens: int | None = None,
    quant: str | None = None,
    quant_overrides: dict[str, str] | None = None,
    embedding_quant: str | None = None,
) -> Path:
    """`folder`'s model as the GGUF file `out` (architecture `arch`); returns `out`.

    num_tokens: keep only the tokenizer's first tokens (and the merges among them), for a
    model with a vocabulary that small: reading a GGUF's metadata takes seconds per
    100k tokens. quant: a GGML quant type (`Q8_0`, `Q4_1`, ...) for the layers'
    projections, quantized by the `gguf` package as llama.cpp's quantizer does; the
    rest stays F32. quant_overrides: another type for the projections whose Hugging
    Face name contains a key ({"v_proj": "Q6_K"}: a mix like llama.cpp's Q4_K_M). Types
    the package cannot quantize (Q4_K, Q6_K) get random blocks (random_blocks), so their
    weights are the file's own, not the folder's. embedding_quant: a type for
    token_embd (llama.cpp's Q4_1 and Q4_0 files keep it in Q8_0)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), arch)
    _write_config(writer, config)
    _write_tokenizer(writer, folder, num_tokens)
    names = gguf.get_tensor_name_map(
        getattr(gguf.MODEL_ARCH, GGUF_ARCH[arch]), config["num_hidden_layers"]
    )
    num_heads = config["num_attention_heads"]
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    for name, weight in sorted(load_file(str(folder / "model.safetensors")).items()):
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        weight = weight.astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = num_heads if "q_proj" in name else num_kv_heads
            weight = _llama_cpp_permute(weight, heads)
        overrides = [t for key, t in (quant_overrides or {}).items() if key in name]
        name_quant = None
        if name.endswith("_proj.weight"):
            name_quant = overrides[0] if overrides else quant
        elif name == "model.embed_tokens.weight":
            name_quant = embedding_quant
        if name_quant is not None:
            qtype = gguf.GGMLQuantizationType[name_quant]
            try:
                raw = gguf.quants.quantize(weight, qtype)
            except NotImplementedError:
                raw = random_blocks(name_quant, weight.shape, seed=zlib.crc32(name.encode()))
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, weight)
    divisors = _llama3_rope_freqs(config)
    if divisors is not None:
        writer.add_tensor("rope_freqs.weight", divisors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# Where each block of these types keeps its fp16 numbers (d, and dmin for Q4_K), by byte
# offset: random bytes elsewhere are valid blocks, random fp16 there could be inf or NaN.
_FP16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(quant: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    """A [rows, columns] tensor of GGML type `quant` (Q4_K or Q6_K), made of random blocks:
    random scales, minima and weights, fp16 numbers in [1e-4, 2e-4]. Its bytes, [rows,
    bytes per row]."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]]
    rows, columns = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, columns // block_size, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS[quant]:
        numbers = rng.uniform(1e-4, 2e-4, blocks.shape[:2]).astype(np.float16)
        blocks[..., offset : offset + 2] = numbers[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def _rope(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _llama3_rope_freqs(config: dict) -> np.ndarray | None:
    """llama.cpp's `rope_freqs.weight` for llama3 rope scaling: per rotary frequency, the
    divisor the scaling applies (LlamaModel.generate_extra_tensors, loop for loop)."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    divisors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            divisors.append(1)
        elif wavelen > low_freq_wavelen:
            divisors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def _write_config(writer, config: dict) -> None:
    num_heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or num_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = _rope(config)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _write_tokenizer(writer, folder: Path, num_tokens: int | None) -> None:
    """tokenizer.json's byte-level BPE as llama.cpp's `gpt2` tokenizer metadata."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = set()
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added["special"]:
            special.add(added["id"])
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    if num_tokens is not None:
        tokens = tokens[:num_tokens]
        kept = set(tokens)
        merges = [m for m in merges if set(m.split(" ")) | {m.replace(" ", "")} <= kept]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL if i in special else _NORMAL for i in range(len(tokens))])
    writer.add_token_merges(merges)
    path = folder / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    writer.add_bos_token_id(generation.get("bos_token_id", 1))
    writer.add_eos_token_id(generation.get("eos_token_id", 2))
    writer.add_add_bos_token(False)
    template = folder / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text())
