"""`lamina bench perplexity`: llama-perplexity's chunk file and output read back, the
extra tool built only when missing, and lamina's side of the measure against
transformers' own logits on the same chunks. Nothing here builds llama.cpp."""

from __future__ import annotations

import math
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from app.bench import peers_build, perplexity
from app.bench.corpus import PASSAGE


def write_logits_file(path: Path, n_ctx: int, tokens: list[int], n_vocab: int = 7) -> None:
    """The header llama-perplexity writes with --kl-divergence-base (log-probs omitted)."""
    n_chunk = len(tokens) // n_ctx
    header = b"_logits_" + struct.pack("<3i", n_ctx, n_vocab, n_chunk)
    path.write_bytes(header + struct.pack(f"<{len(tokens)}i", *tokens) + b"\0" * 64)


def test_the_chunk_tokens_are_read_back(tmp_path):
    write_logits_file(tmp_path / "base.kld", 4, list(range(100, 112)))
    chunks = perplexity.read_chunks(tmp_path / "base.kld")
    assert chunks.n_ctx == 4 and chunks.first == 2
    assert chunks.tokens == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110, 111]]
    (tmp_path / "other").write_bytes(b"GGUF" + b"\0" * 32)
    with pytest.raises(ValueError, match="not a llama-perplexity logits file"):
        perplexity.read_chunks(tmp_path / "other")


def fake_llama_perplexity(tmp_path: Path, exit_code: int = 0) -> Path:
    """A stand-in binary: writes the chunk file it is asked for and prints llama's lines."""
    script = tmp_path / "llama-perplexity"
    script.write_text(
        "#!/bin/sh\n"
        'while [ "$1" != "--kl-divergence-base" ]; do shift; done\n'
        "printf '_logits_\\004\\0\\0\\0\\007\\0\\0\\0\\001\\0\\0\\0' > \"$2\"\n"
        "printf '\\001\\0\\0\\0\\002\\0\\0\\0\\003\\0\\0\\0\\004\\0\\0\\0' >> \"$2\"\n"
        "echo 'perplexity: calculating perplexity over 1 chunks, n_ctx=4' >&2\n"
        "echo 'Final estimate: PPL = 28.4031 +/- 1.25678' >&2\n"
        f"exit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_llama_perplexity_is_run_on_the_text_and_its_estimate_read(tmp_path):
    binary = fake_llama_perplexity(tmp_path)
    logits = tmp_path / "base.kld"
    ppl, error = perplexity.llama_cpp_perplexity(
        binary, tmp_path / "m.gguf", tmp_path / "t.txt", 4, 2, logits
    )
    assert (ppl, error) == (28.4031, 1.25678)
    assert perplexity.read_chunks(logits).tokens == [[1, 2, 3, 4]]
    with pytest.raises(RuntimeError, match="failed"):
        perplexity.llama_cpp_perplexity(
            fake_llama_perplexity(tmp_path, exit_code=1),
            tmp_path / "m.gguf",
            tmp_path,
            4,
            2,
            logits,
        )


def test_only_the_missing_tool_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peers_build, "cpu_flags", lambda: {"avx2"})
    home = tmp_path / "lamina" / "llama.cpp" / peers_build.build_key("9.9.9", {"avx2"})
    (home / "bin").mkdir(parents=True)
    (home / "src" / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp").mkdir(parents=True)
    for target in peers_build.TARGETS:
        (home / "bin" / target).write_text("binary")
    built = []
    monkeypatch.setattr(peers_build, "_build", lambda *args: built.append(args[3]))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing else runs"))
    peers_build.find_or_build("9.9.9")
    assert built == []  # the peers bench's two tools are there
    peers_build.find_or_build("9.9.9", extra=(peers_build.PERPLEXITY,))
    assert built == [("llama-perplexity",)]
    _, build = peers_build.cmake_commands(home, home / "build", 2, ("llama-perplexity",))
    assert build[-2:] == ["--target", "llama-perplexity"]


def test_lamina_scores_the_positions_llama_cpp_scores_as_transformers_does(
    shallow_default_model_path,
):
    """Every chunk's second half, each token given the chunk's tokens before it: lamina's
    engine (prompt_logprobs) against transformers' logits of the same chunks. Real
    weights: a random model's near-uniform predictions could hide an off-by-one."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.tokenizer import Tokenizer

    n_ctx = 48
    ids = Tokenizer(shallow_default_model_path).encode(PASSAGE)[: 3 * n_ctx]
    chunks = perplexity.Chunks(n_ctx, [ids[i : i + n_ctx] for i in range(0, len(ids), n_ctx)])
    ours = perplexity.lamina_perplexity(shallow_default_model_path, "float32", chunks, threads=1)

    model = AutoModelForCausalLM.from_pretrained(
        shallow_default_model_path, torch_dtype=torch.float32
    )

    def reference(shift: int) -> float:
        nll = []
        with torch.no_grad():
            for chunk in chunks.tokens:
                logits = model(torch.tensor([chunk])).logits[0].double()  # [n_ctx, vocab]
                log_probs = torch.log_softmax(logits, dim=-1)
                for position in range(chunks.first + 1, n_ctx):
                    nll.append(-float(log_probs[position - 1 + shift, chunk[position]]))
        assert len(nll) == 3 * (n_ctx - chunks.first - 1)
        return math.exp(sum(nll) / len(nll))

    assert ours == pytest.approx(reference(0), rel=1e-4)
    assert ours != pytest.approx(reference(-1), rel=0.01)  # an off-by-one would show
