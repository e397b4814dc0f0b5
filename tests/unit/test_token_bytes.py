"""A token's bytes are its vocabulary bytes, not the UTF-8 of its decoded text."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from app.token_bytes import byte_level_alphabet
from app.tokenizer import Tokenizer

TEXTS = ["😀 héllo\n\t x", "naïve café — 東京 ∑", "  spaces   and\r\nlines", "<|im_end|> as text"]


@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path) -> Tokenizer:
    return Tokenizer(default_model_path)


def test_the_byte_level_alphabet_covers_every_byte_once() -> None:
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n") and alphabet["a"] == ord("a")


def test_byte_level_tokens_concatenate_to_the_text(tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(t) for t in token_ids) == text.encode("utf-8")


def test_a_token_holding_part_of_a_character_reports_its_byte(tokenizer: Tokenizer) -> None:
    partial = [t for t in tokenizer.encode("😀", add_special_tokens=False)]
    assert len(partial) > 1  # the emoji is split across tokens
    assert tokenizer.token_text(partial[0]) == "\ufffd"
    assert tokenizer.token_bytes(partial[0])[0] == 0xF0
    byte_f0 = next(char for char, byte in byte_level_alphabet().items() if byte == 0xF0)
    single_byte_token = tokenizer._hf.convert_tokens_to_ids(byte_f0)  # the vocabulary's "ð"
    assert tokenizer.token_bytes(single_byte_token) == b"\xf0"
    assert tokenizer.token_text(single_byte_token) == "\ufffd"


def test_special_tokens_are_their_text(tokenizer: Tokenizer) -> None:
    im_end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert [tokenizer.token_bytes(t) for t in im_end] == [b"<|im_end|>"]


def sentencepiece_folder(folder: Path) -> Path:
    """A tiny SentencePiece-style BPE with byte fallback, as LLaMA 2 and Mistral ship."""
    vocab = {"<unk>": 0, "▁": 1, "h": 2, "i": 3, "▁h": 4, "▁hi": 5}
    vocab |= {f"<0x{byte:02X}>": 6 + byte for byte in range(256)}
    merges = [("▁", "h"), ("▁h", "i")]
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    return folder


def test_sentencepiece_byte_fallback_and_spaces(tmp_path: Path) -> None:
    tokenizer = Tokenizer(sentencepiece_folder(tmp_path))
    for text in ["hi hi", "hé😀"]:
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(t) for t in token_ids) == f" {text}".encode()
    assert tokenizer.token_bytes(6 + 0xF0) == b"\xf0"
