"""IncrementalDetokenizer with the byte-level FakeTokenizer and with the real default tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core import SamplingParams
from app.engine.detokenizer import IncrementalDetokenizer
from tests.unit.fakes import FakeTokenizer

FAKE = FakeTokenizer()
MULTILINGUAL = [
    "Hello world! 😀🎉 naïve café — déjà vu",
    "中文测试，日本語のテキスト、한국어 텍스트",
    " Ünïcödé: ∑ x² ≤ ∞, 👩‍👩‍👧‍👦 family, 🇫🇷 flag",
    "tabs\tand\nnewlines\n\n  spaces   ",
]


def feed(detok: IncrementalDetokenizer, token_ids: list[int]) -> tuple[list[str], str | None]:
    """Append tokens until a stop string matches; returns (deltas, stop string)."""
    deltas = []
    for token_id in token_ids:
        delta, stop = detok.append(token_id)
        deltas.append(delta)
        if stop is not None:
            return deltas, stop
    deltas.append(detok.flush())
    return deltas, None


def detokenize(
    tokenizer, token_ids: list[int], prompt: list[int] | None = None, **params
) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [], SamplingParams(**params))
    deltas, stop = feed(detok, token_ids)
    return deltas, stop, detok


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_fake_multibyte_text_never_emits_half_a_character(text: str):
    ids = FAKE.encode(text)
    deltas, stop, detok = detokenize(FAKE, ids, FAKE.encode("prompt: "))
    assert stop is None
    assert "".join(deltas) == detok.output_text == text
    assert not any("\ufffd" in d for d in deltas)
    # One token per byte: each code point comes out whole, on its last byte's token.
    assert [delta for delta in deltas if delta] == list(text)


def test_fake_emoji_is_held_until_complete():
    ids = FAKE.encode("😀")
    detok = IncrementalDetokenizer(FAKE, [], SamplingParams())
    assert [detok.append(i)[0] for i in ids] == ["", "", "", "😀"]


def test_flush_releases_an_incomplete_character():
    ids = FAKE.encode("ok😀")[:-1]  # the emoji's last byte never comes
    deltas, _, detok = detokenize(FAKE, ids)
    assert deltas[-1] == "\ufffd"
    assert "".join(deltas) == FAKE.decode(ids)


def test_stop_string_spanning_tokens_is_cut():
    ids = FAKE.encode("Hello, world. Bye")
    deltas, stop, detok = detokenize(FAKE, ids, stop=("world",))
    assert stop == "world"
    assert detok.output_text == "".join(deltas) == "Hello, "
    assert detok.append(FAKE.encode("x")[0]) == ("", None)  # over after a match
    assert detok.flush() == ""


def test_stop_string_included_on_request():
    ids = FAKE.encode("Hello, world. Bye")
    _, stop, detok = detokenize(FAKE, ids, stop=("world",), include_stop_str_in_output=True)
    assert (stop, detok.output_text) == ("world", "Hello, world")


def test_possible_stop_prefix_is_held_back_then_released():
    detok = IncrementalDetokenizer(FAKE, [], SamplingParams(stop=("END",)))
    outputs = [detok.append(i)[0] for i in FAKE.encode("aEN")]
    assert outputs == ["a", "", ""]  # "E", "EN" could begin "END"
    assert detok.append(FAKE.encode("x")[0]) == ("ENx", None)
    assert detok.append(FAKE.encode("E")[0]) == ("", None)
    assert detok.flush() == "E"  # finished for another reason: nothing is lost
    assert detok.output_text == "aENxE"


def test_earliest_stop_string_wins():
    _, stop, detok = detokenize(FAKE, FAKE.encode("one two three"), stop=("three", "two"))
    assert (stop, detok.output_text) == ("two", "one ")


def test_stop_string_at_the_very_start():
    deltas, stop, detok = detokenize(FAKE, FAKE.encode("STOP now"), stop=("STOP",))
    assert (stop, detok.output_text, "".join(deltas)) == ("STOP", "", "")


def test_multibyte_stop_string():
    _, stop, detok = detokenize(FAKE, FAKE.encode("价格：100元。谢谢"), stop=("元。",))
    assert (stop, detok.output_text) == ("元。", "价格：100")


def test_special_tokens_skipped_or_shown():
    ids = [*FAKE.encode("hi"), FAKE.BOS, *FAKE.encode("yo")]
    assert "".join(detokenize(FAKE, ids)[0]) == "hiyo"
    assert "".join(detokenize(FAKE, ids, skip_special_tokens=False)[0]) == "hi<s>yo"


def test_eos_and_stop_token_text_are_hidden():
    ids = [*FAKE.encode("ab"), FAKE.EOS]
    assert detokenize(FAKE, ids, skip_special_tokens=False)[2].output_text == "ab"
    shown = detokenize(FAKE, ids, skip_special_tokens=False, include_stop_str_in_output=True)
    assert shown[2].output_text == "ab</s>"
    z = FAKE.encode("z")[0]
    assert detokenize(FAKE, [*FAKE.encode("ab"), z], stop_token_ids=(z,))[2].output_text == "ab"
    # Before min_tokens the token does not stop the sequence, so its text stays.
    early = detokenize(FAKE, [z, *FAKE.encode("ab")], stop_token_ids=(z,), min_tokens=2)
    assert early[2].output_text == "zab"
    # With ignore_eos, EOS is an ordinary (special) token.
    assert detokenize(FAKE, ids, skip_special_tokens=False, ignore_eos=True)[2].output_text == (
        "ab</s>"
    )


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, FAKE.vocab_size - 1), max_size=40),
    prompt=st.lists(st.integers(3, FAKE.vocab_size - 1), max_size=8),
)
def test_fake_random_bytes_join_to_the_full_decode(ids: list[int], prompt: list[int]):
    ids = [i for i in ids if i != FAKE.EOS]
    deltas, _, _ = detokenize(FAKE, ids, prompt, skip_special_tokens=False)
    assert "".join(deltas) == FAKE.decode(ids, skip_special_tokens=False)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab😀c ", max_size=30),
    stops=st.lists(st.text(alphabet="ab😀c", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_fake_stop_strings_property(text: str, stops: list[str], include: bool):
    deltas, stop, detok = detokenize(
        FAKE, FAKE.encode(text), stop=tuple(stops), include_stop_str_in_output=include
    )
    output = "".join(deltas)
    assert output == detok.output_text
    if stop is None:
        assert output == text
        assert not any(s in text for s in stops)
        return
    kept = output if include else output + stop
    assert text.startswith(kept) and kept.endswith(stop)
    # The first stop string to complete ends the output: none completes earlier.
    assert not any(s in kept[:-1] for s in stops)


# ---------------------------------------------------------------- real tokenizer
@pytest.fixture(scope="module")
def tokenizer(default_model_path: Path):
    from app.tokenizer import Tokenizer

    return Tokenizer(default_model_path)


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_real_tokenizer_deltas_join_to_decode(tokenizer, text: str):
    prompt = tokenizer.encode("Say something:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, stop, _ = detokenize(tokenizer, ids, prompt)
    assert stop is None
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # Some character really spans several tokens here, or the test proves little.
    if any(ord(c) > 0x7FF for c in text):
        assert any(d == "" for d in deltas[:-1])


def test_real_tokenizer_first_token_keeps_its_leading_space(tokenizer):
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    ids = tokenizer.encode(" Paris.", add_special_tokens=False)
    deltas, _, _ = detokenize(tokenizer, ids, prompt)
    assert deltas[0] == " Paris"
    assert "".join(deltas) == " Paris."


def test_real_tokenizer_chat_prompt_and_eos(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = [*tokenizer.encode("Bonjour, ça va? 🙂", add_special_tokens=False), 2]
    deltas, _, detok = detokenize(tokenizer, ids, prompt)
    assert detok.output_text == "".join(deltas) == "Bonjour, ça va? 🙂"
    shown = detokenize(tokenizer, ids, prompt, skip_special_tokens=False, ignore_eos=True)
    assert shown[2].output_text == tokenizer.decode(ids, skip_special_tokens=False)


def test_real_tokenizer_stop_string_across_tokens(tokenizer):
    ids = tokenizer.encode("Paris is the capital of France.", add_special_tokens=False)
    _, stop, detok = detokenize(tokenizer, ids, stop=("capital of",))
    assert (stop, detok.output_text) == ("capital of", "Paris is the ")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_real_tokenizer_random_ids_join_to_decode(tokenizer, data: st.DataObject):
    vocab = tokenizer.vocab_size
    ids = data.draw(st.lists(st.integers(3, vocab - 1), max_size=30))
    prompt = data.draw(st.lists(st.integers(3, vocab - 1), max_size=6))
    deltas, _, _ = detokenize(tokenizer, ids, prompt)
    assert "".join(deltas) == tokenizer.decode(ids)
