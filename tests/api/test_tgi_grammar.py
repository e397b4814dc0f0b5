"""TGI's `parameters.grammar` on /generate and /generate_stream.

The fake engine with the real compiler shows what reaches the engine and what is
refused before it; the real server, through huggingface_hub's InferenceClient, shows the
grammar doing the work: every output validates or matches, streaming and not.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from huggingface_hub import InferenceClient

from tests.api.conftest import FakeApp, LiveServer
from tests.engine.structured_schemas import SCHEMAS

pytestmark = pytest.mark.anyio
PERSON = SCHEMAS["person"]
CODE = "[A-Z]{2}-[0-9]{3}"

GRAMMARS = [
    ({"type": "json", "value": PERSON}, "json_schema"),
    ({"type": "json", "value": json.dumps(PERSON)}, "json_schema"),  # TGI also takes text
    ({"type": "json_object", "value": PERSON}, "json_schema"),  # TGI's alias of json
    ({"type": "json_schema", "value": {"name": "person", "schema": PERSON}}, "json_schema"),
    ({"type": "regex", "value": CODE}, "regex"),
]


def generate_body(grammar: object) -> dict:
    return {"inputs": "Hi", "parameters": {"max_new_tokens": 2, "grammar": grammar}}


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
@pytest.mark.parametrize(("grammar", "kind"), GRAMMARS)
async def test_a_tgi_grammar_compiles_into_the_params(
    compiling_app: FakeApp, path: str, grammar: dict, kind: str
) -> None:
    response = await compiling_app.client.post(path, json=generate_body(grammar))
    assert response.status_code == 200, response.text
    (request,) = compiling_app.engine.requests
    assert request.params.constraint is not None and request.params.constraint.kind == kind


@pytest.mark.parametrize(
    ("grammar", "named"),
    [
        ({"type": "regex", "value": "(?<=a)b"}, "look-around"),
        ({"type": "regex", "value": {"pattern": "a"}}, "regular expression"),
        ({"type": "json", "value": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"type": "json", "value": "{not json"}, "not valid JSON"),
        ({"type": "json_schema", "value": {"name": "x"}}, "value.schema"),
    ],
)
async def test_a_bad_tgi_grammar_is_a_400_before_the_engine(
    compiling_app: FakeApp, grammar: dict, named: str
) -> None:
    response = await compiling_app.client.post("/generate", json=generate_body(grammar))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "parameters.grammar" and named in error["message"], error
    assert compiling_app.engine.requests == []


@pytest.mark.parametrize("grammar", [{"type": "xml", "value": "a"}, {"value": "a"}, "json"])
async def test_a_grammar_of_no_known_type_is_refused(
    compiling_app: FakeApp, grammar: object
) -> None:
    response = await compiling_app.client.post("/generate", json=generate_body(grammar))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("parameters.grammar")
    assert compiling_app.engine.requests == []


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_huggingface_hub_text_generation_with_a_grammar(
    api_server: LiveServer, stream: bool
) -> None:
    client = InferenceClient(base_url=api_server.url, timeout=120)

    def generate(grammar: dict, **options: object) -> str:
        answer = client.text_generation(
            "A person, as JSON:", max_new_tokens=80, grammar=grammar, stream=stream, **options
        )
        return "".join(answer) if stream else answer

    text = generate({"type": "json", "value": PERSON})
    jsonschema.validate(json.loads(text), PERSON)
    text = generate({"type": "json", "value": PERSON}, do_sample=True, temperature=0.9, seed=5)
    jsonschema.validate(json.loads(text), PERSON)
    text = generate({"type": "regex", "value": CODE})
    assert re.fullmatch(CODE, text), text
