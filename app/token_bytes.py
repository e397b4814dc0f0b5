"""The raw bytes of one token, as OpenAI's `logprobs[].bytes` reports them.

A token's decoded text is not its bytes: a byte-level BPE token can hold part of a UTF-8
character (the first byte of an emoji), which decodes to U+FFFD on its own. The bytes
come from the token's vocabulary string instead:
- byte-level BPE (GPT-2, LLaMA 3, Qwen, SmolLM): each character of the vocabulary string
  stands for one byte through the printable-character table those tokenizers share;
- SentencePiece with byte fallback (LLaMA 2, Mistral, Gemma): `<0xF0>` is the byte 0xF0,
  and `▁` is a space;
- added and special tokens: their text, UTF-8.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

_SENTENCEPIECE_SPACE = "\u2581"


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """Vocabulary character -> the byte it stands for, in byte-level BPE vocabularies.

    Bytes that are printable and not a space keep their own code point; the other 68
    bytes are numbered from U+0100 upwards in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    alphabet = {chr(byte): byte for byte in printable}
    shifted = (byte for byte in range(256) if byte not in alphabet.values())
    alphabet.update({chr(0x100 + index): byte for index, byte in enumerate(shifted)})
    return alphabet


def is_byte_level(hf_tokenizer: Any) -> bool:
    """Whether a Hugging Face fast tokenizer decodes with the byte-level decoder."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def vocabulary_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary string stands for (see the module doc)."""
    if byte_level:
        alphabet = byte_level_alphabet()
        if all(char in alphabet for char in piece):
            return bytes(alphabet[char] for char in piece)
        return piece.encode("utf-8")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")
