"""/v1/embeddings on the real engine (the `api_server` process), through the `openai`
client: strings, token ids, `dimensions`, base64; the same text alone and among 32
inputs gives the same vector bitwise; paraphrases are closer than unrelated texts.
Pooling is checked against transformers in tests/engine/test_prompt_outputs.py."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest
from openai import OpenAI

from app.api.dialect_embeddings import unit_vector
from tests.api.conftest import LiveServer

pytestmark = [pytest.mark.system, pytest.mark.slow]

HIDDEN_SIZE = 576  # SmolLM2-135M
# (text, its paraphrase, an unrelated text)
TRIPLES = [
    (
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "The stock market fell sharply today.",
    ),
    (
        "How do I reset my password?",
        "What are the steps to change my password?",
        "The recipe calls for two cups of flour.",
    ),
    (
        "The weather is sunny and warm.",
        "It is a bright, hot day outside.",
        "Quantum computers use qubits.",
    ),
    (
        "He bought a new car yesterday.",
        "Yesterday he purchased a new automobile.",
        "Elephants live in large herds.",
    ),
]


def client_for(server: LiveServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def cosine(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b))  # unit vectors


def test_strings_ids_dimensions_and_base64(api_server: LiveServer) -> None:
    client = client_for(api_server)
    texts = ["Embeddings turn text into vectors.", "Paris is in France."]
    answer = client.embeddings.create(model=api_server.model, input=texts, encoding_format="float")
    assert [item.index for item in answer.data] == [0, 1]
    vectors = [item.embedding for item in answer.data]
    for vector in vectors:
        assert len(vector) == HIDDEN_SIZE
        assert math.fsum(x * x for x in vector) == pytest.approx(1.0, abs=1e-9)
    tokenized = httpx.post(api_server.url + "/tokenize", json={"prompt": texts[0]}, timeout=30)
    ids = tokenized.json()["tokens"]
    assert (
        answer.usage.prompt_tokens > len(ids)
        and answer.usage.total_tokens == answer.usage.prompt_tokens
    )
    by_ids = client.embeddings.create(model=api_server.model, input=ids, encoding_format="float")
    assert by_ids.data[0].embedding == vectors[0]  # the same tokens: the same vector
    short = client.embeddings.create(
        model=api_server.model, input=texts, dimensions=64, encoding_format="float"
    )
    for vector, cut in zip(vectors, short.data):
        assert cut.embedding == pytest.approx(unit_vector(vector, 64), abs=1e-12)
    packed = client.embeddings.create(model=api_server.model, input=texts, encoding_format="base64")
    for vector, item in zip(vectors, packed.data):
        raw = base64.b64decode(item.embedding)
        assert struct.unpack(f"<{HIDDEN_SIZE}f", raw) == pytest.approx(vector, rel=1e-6, abs=1e-7)
    # The client's default asks for base64 and decodes it itself.
    default = client.embeddings.create(model=api_server.model, input=texts[0])
    assert default.data[0].embedding == pytest.approx(vectors[0], rel=1e-6, abs=1e-7)


def test_the_same_text_alone_and_among_32_is_bitwise_the_same(api_server: LiveServer) -> None:
    client = client_for(api_server)
    text = "Batch invariance: the same input gives the same vector in any company."
    alone = client.embeddings.create(model=api_server.model, input=text, encoding_format="float")
    others = [f"Document {i}: " + "lorem ipsum " * (i % 9) for i in range(31)]
    batch = others[:13] + [text] + others[13:]
    together = client.embeddings.create(
        model=api_server.model, input=batch, encoding_format="float"
    )
    assert len(together.data) == 32
    assert together.data[13].embedding == alone.data[0].embedding


def test_paraphrases_are_closer_than_unrelated_texts(api_server: LiveServer) -> None:
    client = client_for(api_server)
    texts = [text for triple in TRIPLES for text in triple]
    answer = client.embeddings.create(model=api_server.model, input=texts, encoding_format="float")
    vectors = [item.embedding for item in answer.data]
    for i in range(len(TRIPLES)):
        text, paraphrase, unrelated = vectors[3 * i : 3 * i + 3]
        assert cosine(text, paraphrase) > cosine(text, unrelated), TRIPLES[i]
        assert cosine(text, paraphrase) > cosine(paraphrase, unrelated), TRIPLES[i]


def test_tgi_embed(api_server: LiveServer) -> None:
    text = "Paris is in France."
    tgi = httpx.post(api_server.url + "/embed", json={"inputs": text}, timeout=60).json()
    openai_vector = client_for(api_server).embeddings.create(
        model=api_server.model, input=text, encoding_format="float"
    )
    assert tgi == [openai_vector.data[0].embedding]


def test_langchain_embeddings_with_lamina_s_own_tokens(api_server: LiveServer) -> None:
    """LangChain's OpenAIEmbeddings as the README configures it: texts sent as text (by
    default it sends OpenAI's tiktoken ids, which lamina would read as its own), in
    chunks of at most LAMINA_MAX_PROMPTS_PER_REQUEST. Its vectors are the openai
    client's."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=api_server.model,
        base_url=api_server.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        chunk_size=32,
        max_retries=0,
    )
    texts = [
        f"Sentence number {i} is about {topic}." for i, topic in enumerate(["cats", "tea"] * 20)
    ]
    vectors = embeddings.embed_documents(texts)  # 40 texts: two requests
    assert len(vectors) == 40 and all(len(v) == HIDDEN_SIZE for v in vectors)
    # The client's default transport, as LangChain's: base64 float32.
    direct = client_for(api_server).embeddings.create(model=api_server.model, input=texts[33:35])
    assert [item.embedding for item in direct.data] == vectors[33:35]
    assert embeddings.embed_query(texts[5]) == vectors[5]
