"""Incremental detokenizer: token ids in, safe-to-emit text deltas out, stop strings found.

Decoding each token on its own is wrong: a character can span several byte-level tokens,
and SentencePiece/BPE tokenizers decide a token's leading space from its left context. So
we decode a small window of recent tokens and take the text it adds beyond the window's
already-settled prefix (two offsets into the token ids, as mini-sglang and TGI do):

    ids:  [ ... context ... | settled window | pending tokens ]
                            ^prefix_offset   ^read_offset

The first window is the prompt's last few tokens, so the first output token gets the
leading space (or not) that it has in the full text.
"""

from __future__ import annotations

from app.core import SamplingParams
from app.engine.protocol import TokenizerLike
from app.engine.stopping import find_stop_string, matched_stop_token, partial_stop_length

NUM_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context, never emitted

# Byte-level tokenizers decode an incomplete UTF-8 sequence (a character whose bytes are
# split across tokens) to U+FFFD. Emitting it would send the client a replacement
# character the finished text does not contain, and the later bytes could never fix
# it. So text ending in U+FFFD is held back until a later token completes the character
# (or until flush(), if the model really ends on an invalid byte).
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Per-sequence decoding state. Owned by the engine thread."""

    def __init__(
        self, tokenizer: TokenizerLike, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._params = params
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._ids = self._context(prompt_token_ids)
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(self._ids)  # tokens before it are in _settled_text
        self._prefix_text = self._decode(self._ids)
        self._settled_text = ""  # output text of the tokens before read_offset
        self._visible_len = 0  # length of the text usable so far (settled + complete tail)
        self._num_output_tokens = 0
        self._done = False  # a stop string matched, or flush() ran
        self.output_text = ""  # everything emitted so far

    def _context(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt's last tokens, minus any that end in half a character.

        A prompt given as token ids may end inside a character; the output's first bytes
        must not complete it (they would vanish into the prompt's text), so those
        trailing tokens are left out of the context.
        """
        context = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        while context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context.pop()
        return context

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=self._params.skip_special_tokens
        )

    def append(self, token_id: int) -> tuple[str, str | None]:
        """Add one sampled token: (text safe to emit now, the stop string that matched or None).

        After a stop string matched, the sequence is over: the output is cut at the stop
        string (kept only with include_stop_str_in_output) and later calls return ("", None).
        A token that stops the sequence by itself (EOS, a stop_token_ids entry, past
        min_tokens) adds no text unless include_stop_str_in_output.
        """
        if self._done:
            return "", None
        self._num_output_tokens += 1
        if self._hides(token_id):
            return "", None
        self._ids.append(token_id)
        tail = self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]
        if tail.endswith(_REPLACEMENT_CHAR):
            tail = tail.rstrip(_REPLACEMENT_CHAR)  # incomplete character: see the note above
        else:
            self._settle(tail)
            tail = ""
        return self._emit(self._settled_text + tail)

    def flush(self) -> str:
        """At finish (not after a stop string): release every held-back character."""
        if self._done:
            return ""
        self._done = True
        tail = self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]
        return self._take(self._settled_text + tail, None)

    def _hides(self, token_id: int) -> bool:
        if self._params.include_stop_str_in_output:
            return False
        matched, _ = matched_stop_token(
            token_id, self._num_output_tokens, self._params, self._tokenizer.eos_token_ids
        )
        return matched

    def _settle(self, tail: str) -> None:
        """The window decoded to whole characters: move it into settled text."""
        self._settled_text += tail
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])

    def _emit(self, text: str) -> tuple[str, str | None]:
        """Emit what `text` (all usable output text) allows: up to a stop string, or up to
        a suffix that may still become one."""
        stops = self._params.stop
        if not stops:
            return self._take(text, len(text)), None
        search_from = max(0, self._visible_len - self._max_stop_len + 1)
        self._visible_len = len(text)
        match = find_stop_string(text, stops, search_from)
        if match is not None:
            index, stop = match
            self._done = True
            end = index + len(stop) if self._params.include_stop_str_in_output else index
            return self._take(text, end), stop
        return self._take(text, len(text) - partial_stop_length(text, stops)), None

    def _take(self, text: str, end: int | None) -> str:
        """Emit text[len(output_text):end]."""
        start = len(self.output_text)
        delta = text[start:end] if end is None or end > start else ""
        self.output_text += delta
        return delta
