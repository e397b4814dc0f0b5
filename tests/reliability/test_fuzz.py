"""Bad input at scale: no request, however strange, gets a 5xx.

- schemathesis generates requests from the app's own OpenAPI schema for every
  generation route, both valid ones (they run on the real tiny engine) and invalid
  ones; at least MIN_CASES cases in all.
- hypothesis throws adversarial JSON at the request models' fields: wrong types, huge
  numbers, NaN and Infinity (Python's json accepts them), lone surrogates, deep nesting.

Every answer must be below 500, and every error must be the documented envelope. The
server caps max_tokens (LAMINA_MAX_TOKENS_LIMIT=16) so valid cases stay cheap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.api.schemas_tgi import GenerateParameters
from app.api.unicode_guard import lone_surrogate_offset
from app.config import Settings
from app.main import create_app
from tests.api.conftest import ThreadedServer

GENERATION_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/generate",
    "/generate_stream",
    "/",
    "/v1/embeddings",
    "/embed",
)
EXAMPLES_PER_OPERATION = 60  # x 7 routes x 2 modes
MIN_CASES = 500


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same cases every run: a failure reproduces
        database=None,
        suppress_health_check=list(HealthCheck),
    )


num_cases = {"schemathesis": 0}


class Fuzzed:
    def __init__(self, url: str, openapi: dict) -> None:
        self.url = url
        self.schema = schemathesis.openapi.from_dict(openapi)
        self.client = httpx.Client(base_url=url, timeout=60)


@pytest.fixture(scope="module")
def fuzzed(tiny_model_path) -> Iterator[Fuzzed]:
    settings_ = Settings(
        model=tiny_model_path, kv_cache_gb=0.02, max_model_len=1024, max_tokens_limit=16
    )
    app = create_app(settings_)
    with ThreadedServer(app) as server:
        fuzzed = Fuzzed(server.url, app.openapi())
        yield fuzzed
        fuzzed.client.close()


def assert_no_server_error(response, what: object) -> None:
    assert response.status_code < 500, f"{response.status_code} for {what!r}: {response.text}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
        assert {"type", "param", "code"} <= set(error), response.text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_schemathesis_cases_never_get_a_5xx(fuzzed: Fuzzed, path: str, mode) -> None:
    operation = fuzzed.schema[path]["POST"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @fuzz_settings(EXAMPLES_PER_OPERATION)
    def check(case) -> None:
        num_cases["schemathesis"] += 1
        response = case.call(base_url=fuzzed.url, timeout=60)
        assert_no_server_error(response, case.body)

    check()


def test_schemathesis_ran_enough_cases() -> None:
    if num_cases["schemathesis"] == 0:
        pytest.skip("run with the schemathesis tests above")
    print(f"schemathesis: {num_cases['schemathesis']} cases")
    assert num_cases["schemathesis"] >= MIN_CASES, num_cases


# --- hypothesis: adversarial values in every field ----------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["\ud800", "\udfff", "\x00", "<|im_end|>", "�", "🦙" * 20]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


def bodies(fields: list[str], base: dict) -> st.SearchStrategy[dict]:
    """`base` (a valid request) with random fields replaced by adversarial values."""
    changes = st.dictionaries(st.sampled_from([*fields, "unknown_field"]), json_values, max_size=4)
    return changes.map(lambda c: {**base, **c})


def post_raw(client: httpx.Client, path: str, body: object):
    # allow_nan: NaN and Infinity go out as bare tokens, which Python's json.loads accepts.
    content = json.dumps(body, allow_nan=True)
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


COMPLETION_FIELDS = sorted(CompletionRequest.model_fields)
CHAT_FIELDS = sorted(ChatCompletionRequest.model_fields)
TGI_FIELDS = sorted(GenerateParameters.model_fields)


@given(body=bodies(COMPLETION_FIELDS, {"prompt": "Hello", "max_tokens": 4}))
@fuzz_settings(150)
def test_completion_fields_never_cause_a_5xx(fuzzed: Fuzzed, body: dict) -> None:
    assert_no_server_error(post_raw(fuzzed.client, "/v1/completions", body), body)


@given(body=bodies(CHAT_FIELDS, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
@fuzz_settings(150)
def test_chat_fields_never_cause_a_5xx(fuzzed: Fuzzed, body: dict) -> None:
    assert_no_server_error(post_raw(fuzzed.client, "/v1/chat/completions", body), body)


@given(parameters=bodies(TGI_FIELDS, {"max_new_tokens": 4}), inputs=json_values)
@fuzz_settings(150)
def test_tgi_parameters_never_cause_a_5xx(fuzzed: Fuzzed, parameters: dict, inputs) -> None:
    for body in ({"inputs": "Hi", "parameters": parameters}, {"inputs": inputs}):
        assert_no_server_error(post_raw(fuzzed.client, "/generate", body), body)


@given(messages=json_values)
@fuzz_settings(100)
def test_chat_messages_of_any_shape_never_cause_a_5xx(fuzzed: Fuzzed, messages) -> None:
    body = {"messages": messages, "max_tokens": 2}
    assert_no_server_error(post_raw(fuzzed.client, "/v1/chat/completions", body), body)


# --- lone surrogates ----------------------------------------------------------------------

surrogate_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
        st.sampled_from('\\"u'),
    ),
    max_size=12,
)


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@given(values=st.lists(surrogate_text, max_size=4), ensure_ascii=st.booleans())
@fuzz_settings(500)
def test_the_guard_finds_exactly_the_bodies_with_lone_surrogates(values, ensure_ascii) -> None:
    body = json.dumps({"texts": values}, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    if not ensure_ascii and not all(map(is_unicode, values)):
        return  # raw surrogates are invalid UTF-8: the JSON parser refuses those already
    assert (lone_surrogate_offset(body) is None) == all(map(is_unicode, values))


def test_lone_surrogates_get_a_400_on_every_route(fuzzed: Fuzzed) -> None:
    cases = [
        ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}'),
        ("/v1/completions", '{"prompt": "Hi", "model": "x\\udc00", "max_tokens": 2}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
        ("/generate", '{"inputs": "a\\ud83d\\u0041"}'),
        ("/tokenize", '{"prompt": "\\udfff"}'),
        ("/detokenize", '{"tokens": [1], "model": "\\ud800"}'),
    ]
    for path, raw in cases:
        response = fuzzed.client.post(
            path, content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_unicode"
    pair = '{"prompt": "\\ud83e\\udd99 \\\\ud800", "max_tokens": 2}'  # a llama, a literal \ud800
    response = fuzzed.client.post(
        "/v1/completions", content=pair, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text


def test_extreme_sampling_values_behave_like_their_limits(fuzzed: Fuzzed) -> None:
    """Values that underflow float32 (found by schemathesis) act like their limit case."""

    def text(**sampling) -> str:
        body = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True, **sampling}
        response = fuzzed.client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    assert text(temperature=5e-324, seed=1) == greedy  # that small is greedy
    assert text(temperature=1.0, top_p=5e-324, seed=1) == greedy  # keeps the best token
    assert text(temperature=1e-30, seed=2) == greedy
    text(repetition_penalty=5e-324)
    tgi = {"inputs": "Once", "parameters": {"temperature": 5e-324, "top_p": 5e-324}}
    assert fuzzed.client.post("/generate", json=tgi).status_code == 200
