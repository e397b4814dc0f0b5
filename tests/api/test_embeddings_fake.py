"""/v1/embeddings and TGI's /embed over the fake engine: what reaches the engine (one
prompt-only request per input, with the pooling), the answer's shape (unit vectors,
`dimensions`, base64 float32s, usage) and each 400."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path

import pytest

from app.api.dialect_embeddings import base64_float32, unit_vector
from app.embedding_pooling import resolve_pooling
from tests.api.conftest import FakeApp, fake_settings, running_fake_app
from tests.api.fake_engine import FakeEngine, fake_embedding

pytestmark = pytest.mark.anyio


async def embed(fake_app: FakeApp, **body):  # noqa: ANN003, ANN201
    return await fake_app.client.post("/v1/embeddings", json=body)


async def test_each_input_is_a_prompt_only_request_pooled_as_set(fake_app: FakeApp) -> None:
    tokenizer = fake_app.engine.tokenizer
    response = await embed(fake_app, input=["Hello there", "General Kenobi"], model=fake_app.model)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "list" and answer["model"] == fake_app.model
    requests = fake_app.engine.requests[-2:]
    assert [r.prompt_token_ids for r in requests] == [
        tokenizer.encode("Hello there"),
        tokenizer.encode("General Kenobi"),
    ]
    for request in requests:
        assert request.params.max_tokens == 0 and request.params.pooling == "last"
    for index, (item, request) in enumerate(zip(answer["data"], requests)):
        assert item["object"] == "embedding" and item["index"] == index
        expected = unit_vector(fake_embedding(request.prompt_token_ids), None)
        assert item["embedding"] == pytest.approx(expected, abs=1e-12)
        assert math.fsum(x * x for x in item["embedding"]) == pytest.approx(1.0)
    num_tokens = sum(len(r.prompt_token_ids) for r in requests)
    assert answer["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}


async def test_token_ids_dimensions_and_base64(fake_app: FakeApp) -> None:
    ids = [[1, 2, 3], [4, 5]]
    whole = (await embed(fake_app, input=ids)).json()["data"]
    cut = (await embed(fake_app, input=ids, dimensions=3)).json()["data"]
    packed = (await embed(fake_app, input=ids, dimensions=3, encoding_format="base64")).json()
    for full, short, coded in zip(whole, cut, packed["data"]):
        assert short["embedding"] == pytest.approx(unit_vector(full["embedding"], 3))
        assert len(short["embedding"]) == 3
        raw = base64.b64decode(coded["embedding"])
        assert struct.unpack("<3f", raw) == pytest.approx(short["embedding"], rel=1e-6)
        assert coded["embedding"] == base64_float32(short["embedding"])
    single = (await embed(fake_app, input=[7, 8, 9])).json()["data"]
    assert len(single) == 1 and fake_app.engine.requests[-1].prompt_token_ids == [7, 8, 9]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ""}, "input", ("empty",)),
        ({"input": []}, "input", ("empty",)),
        ({"input": ["a", ""]}, "input[1]", ("empty",)),
        ({"input": [[]]}, "input[0]", ("empty",)),
        ({"input": [[1, 99999999]]}, "input[0]", ("vocabulary",)),
        ({"input": "a", "dimensions": 0}, "dimensions", ("greater than or equal to 1",)),
        ({"input": "a", "dimensions": 577}, "dimensions", ("hidden size 576", "577")),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", ("float", "base64")),
        ({"input": ["a"] * 33}, "input", ("33 inputs", "at most 32")),
        ({"input": [5] * 9000}, "input", ("at most", "context window")),
    ],
)
async def test_bad_requests_name_the_field(fake_app: FakeApp, body, param, words) -> None:
    response = await embed(fake_app, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/embeddings", "truncate_prompt_tokens", 8),  # vLLM's
        ("/embed", "prompt_name", "query"),  # text-embeddings-inference's
        ("/embed", "truncation_direction", "Left"),
    ],
)
async def test_a_field_that_would_change_the_vector_is_refused_by_name(
    fake_app: FakeApp, path: str, field: str, value: object
) -> None:
    inputs = "input" if path == "/v1/embeddings" else "inputs"
    before = len(fake_app.engine.requests)
    response = await fake_app.client.post(path, json={inputs: "Hi", field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (field, "unsupported_field")
    assert len(fake_app.engine.requests) == before  # nothing reached the engine
    default = await fake_app.client.post(path, json={inputs: "Hi", "truncation_direction": "Right"})
    assert default.status_code == 200, default.text


async def test_priority_reaches_the_engine(fake_app: FakeApp) -> None:
    response = await embed(fake_app, input="Hi", priority=-3)
    assert response.status_code == 200
    assert fake_app.engine.requests[-1].priority == -3


async def test_an_unknown_model_is_a_404(fake_app: FakeApp) -> None:
    response = await embed(fake_app, input="Hi", model="not-this-one")
    assert response.status_code == 404


async def test_mean_pooling_setting_and_tgi_embed(default_model_path: Path, http_tokenizer) -> None:
    settings = fake_settings(default_model_path, embedding_pooling="mean")
    async with running_fake_app(settings, FakeEngine(http_tokenizer)) as app:
        response = await app.client.post("/embed", json={"inputs": ["Hi", "there"]})
        assert response.status_code == 200, response.text
        vectors = response.json()
        requests = app.engine.requests[-2:]
        assert [r.params.pooling for r in requests] == ["mean", "mean"]
        for vector, request in zip(vectors, requests):
            assert vector == pytest.approx(
                unit_vector(fake_embedding(request.prompt_token_ids), None)
            )
        raw = await app.client.post("/embed", json={"inputs": "Hi", "normalize": False})
        assert raw.json() == [list(fake_embedding(app.engine.requests[-1].prompt_token_ids))]
        too_long = {"inputs": "word " * 9000}
        refused = await app.client.post("/embed", json=too_long)
        assert refused.status_code == 400 and "error_type" in refused.json()
        cut = await app.client.post("/embed", json={**too_long, "truncate": True})
        assert cut.status_code == 200
        assert len(app.engine.requests[-1].prompt_token_ids) == 8191


def test_pooling_follows_a_sentence_transformers_config(tmp_path: Path) -> None:
    assert resolve_pooling("auto", tmp_path) == "last"  # no config: the last token
    modules = [
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text('{"word_embedding_dimension": 8, "pooling_mode_mean_tokens": true}')
    assert resolve_pooling("auto", tmp_path) == "mean"
    assert resolve_pooling("last", tmp_path) == "last"  # an explicit setting wins
    other = tmp_path / "other"
    other.mkdir()
    (other / "modules.json").write_text((tmp_path / "modules.json").read_text())
    (other / "1_Pooling").mkdir()
    (other / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    assert resolve_pooling("auto", other) == "last"  # CLS is not computed: the last token
