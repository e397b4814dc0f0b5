"""What LAMINA_MODEL may name, served by the real loader and engine: the default model's
GGUF file (exactly the weights and the greedy tokens of its converted folder; its
folder goes to the user's cache, as a server's would), a hub id served offline from
a hub cache built here (by id and by revision), and models the loader cannot use, each
refused at start-up in one line naming the file, the field and what would work.

Nothing here reaches a hub: huggingface_hub runs offline on a cache in a temporary
folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from app.model import gguf_folder
from app.model.loader import load_model
from app.tokenizer import Tokenizer
from app.weights_source import parse_model_spec, resolve_model_folder
from tests.model.gguf_writer import write_gguf
from tests.model.helpers import hf_greedy
from tests.model.serving import greedy, refusal, served

pytestmark = pytest.mark.anyio
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def build_hub_cache(cache, folder):
    """huggingface_hub's cache layout holding `folder` as `org/tiny` at COMMIT, which the
    refs `main` and `v1` name."""
    repo = cache / "models--org--tiny"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    return cache


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_path):
    """A hub cache holding `org/tiny` at COMMIT (refs: main and v1), huggingface_hub
    offline over it."""
    from huggingface_hub import constants

    cache = build_hub_cache(tmp_path / "hub", tiny_model_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_the_default_gguf_dequantizes_to_the_converted_folder(
    default_gguf_path, default_model_path
):
    """`lamina weights` converts the same file with transformers: every weight matches."""
    from_gguf = load_model(resolve_model_folder(default_gguf_path), kernels="reference")
    from_folder = load_model(default_model_path, kernels="reference")
    gguf_state, folder_state = from_gguf.state_dict(), from_folder.state_dict()
    assert gguf_state.keys() == folder_state.keys()
    for name, tensor in folder_state.items():
        assert torch.equal(gguf_state[name], tensor), name
    assert parse_model_spec(default_gguf_path).served_name == "SmolLM2-135M-Instruct.Q4_1"


def test_the_default_gguf_brings_its_tokenizer_and_chat_template(
    default_gguf_path, default_model_path
):
    from_gguf = Tokenizer(resolve_model_folder(default_gguf_path))
    from_folder = Tokenizer(default_model_path)
    text = "Bonjour! 1234 <|im_start|> tabs\tand  spaces, ünïcödé 東京"
    assert from_gguf.encode(text) == from_folder.encode(text)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    assert from_gguf.apply_chat_template(chat) == from_folder.apply_chat_template(chat)
    assert from_gguf.eos_token_ids == from_folder.eos_token_ids
    assert from_gguf.vocab_size == from_folder.vocab_size


async def test_the_default_gguf_serves_the_folders_greedy_tokens(
    default_gguf_path, default_model_path
):
    """Against transformers' greedy tokens on the folder (lamina on the folder matches
    them: tests/model/test_greedy_generation.py)."""
    async with served(default_gguf_path) as client:
        models = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
        ids, text = await greedy(client, PROMPT, 10)
    assert text.startswith("The capital of France is Paris")
    prompt_ids = Tokenizer(default_model_path).encode(PROMPT)  # as /generate encodes it
    assert ids == hf_greedy(default_model_path, [prompt_ids], 10)[0]


async def test_a_hub_id_serves_offline_from_the_cache(hub_cache, tiny_model_path):
    async with served(tiny_model_path) as client:
        expected = await greedy(client, "Hello", 6)
    for revision in ("", "@v1", f"@{COMMIT}"):
        async with served(f"org/tiny{revision}") as client:
            models = (await client.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["org/tiny"], revision
            assert await greedy(client, "Hello", 6) == expected, revision


@pytest.mark.system
def test_lamina_serve_takes_a_hub_id_offline_from_the_environment(tmp_path, tiny_model_path):
    """As a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE=1 in a real server's environment."""
    import httpx

    from tests.server_process import ServerProcess

    env = {
        "LAMINA_MODEL": "org/tiny@v1",
        "HF_HUB_CACHE": str(build_hub_cache(tmp_path / "hub", tiny_model_path)),
        "HF_HUB_OFFLINE": "1",
        "LAMINA_KV_CACHE_GB": "0.05",
    }
    with ServerProcess(extra_env=env) as server:
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["org/tiny"]
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
        assert httpx.post(server.url + "/generate", json=body, timeout=60).status_code == 200


async def test_a_hub_id_missing_offline_is_one_line(hub_cache, log_lines):
    message = await refusal("org/absent", log_lines)
    assert "hub model org/absent at revision main" in message
    assert "HF_HUB_OFFLINE is set" in message and str(hub_cache) in message
    assert "not a local folder either" in message


def test_what_lamina_model_names():
    assert parse_model_spec("org/name").kind == "hub"
    spec = parse_model_spec("org/name@v2.1")
    assert (spec.kind, spec.repo_id, spec.revision) == ("hub", "org/name", "v2.1")
    assert parse_model_spec("./org/name").kind == "folder"
    assert parse_model_spec("/models/org/name").kind == "folder"
    assert parse_model_spec("no-slash").kind == "folder"
    assert parse_model_spec("models/x.Q4_K_M.gguf").served_name == "x.Q4_K_M"


def test_an_ollama_blob_is_read_as_the_gguf_file_it_is(tmp_path, tiny_model_path, gguf_cache):
    """Ollama keeps a model as a blob named sha256-<digest>, without the .gguf suffix: it
    is known by its magic bytes and loads as the same file named .gguf does."""
    named = write_gguf(tiny_model_path, tmp_path / "tiny.gguf", num_tokens=1024)
    blob = tmp_path / "blobs" / "sha256-0123456789abcdef"
    blob.parent.mkdir()
    shutil.copyfile(named, blob)
    spec = parse_model_spec(blob)
    assert (spec.kind, spec.served_name) == ("gguf", "sha256-0123456789abcdef")
    from_blob = load_model(resolve_model_folder(blob), kernels="reference").state_dict()
    from_named = load_model(resolve_model_folder(named), kernels="reference").state_dict()
    assert from_blob.keys() == from_named.keys()
    assert all(torch.equal(from_blob[name], from_named[name]) for name in from_named)
    not_gguf = tmp_path / "notes"
    not_gguf.write_text("GGU")
    assert parse_model_spec(not_gguf).kind == "folder"


async def test_a_folder_without_config_json_names_the_gguf_it_holds(
    tmp_path, default_gguf_path, log_lines
):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "model.gguf").symlink_to(default_gguf_path)
    message = await refusal(folder, log_lines)
    assert "config.json" in message and "model.gguf" in message
    assert "set LAMINA_MODEL to that file" in message


async def test_a_folder_without_safetensors_is_one_line(tmp_path, tiny_model_path, log_lines):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_path, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"")
    message = await refusal(folder, log_lines)
    assert "no *.safetensors weights" in message and "pytorch_model.bin" in message


async def test_an_unsupported_gguf_architecture_is_one_line(
    tmp_path, tiny_model_path, gguf_cache, log_lines
):
    path = write_gguf(tiny_model_path, tmp_path / "bert.gguf", arch="llama", num_tokens=64)
    _rewrite_string(path, b"llama", b"bloom")  # general.architecture, same length
    message = await refusal(path, log_lines)
    assert str(path) in message and "general.architecture 'bloom'" in message
    assert "llama, qwen2, qwen3" in message and "Hugging Face folder" in message


async def test_an_unreadable_quant_type_is_one_line(tmp_path, gguf_cache, log_lines):
    import gguf
    import numpy as np

    # A tensor stored as Q8_1: a type the gguf package knows but cannot dequantize.
    odd = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(odd), "llama")
    writer.add_tensor(
        "blk.0.attn_q.weight",
        np.zeros((4, 40), dtype=np.uint8),  # 4 rows of one 32-value block (40 bytes)
        raw_dtype=gguf.GGMLQuantizationType.Q8_1,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = await refusal(odd, log_lines)
    assert str(odd) in message and "'blk.0.attn_q.weight'" in message
    assert "Q8_1" in message and "Q4_K" in message


async def test_an_unknown_quant_type_is_one_line(tmp_path, tiny_model_path, gguf_cache, log_lines):
    path = write_gguf(tiny_model_path, tmp_path / "future.gguf", num_tokens=64)
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    num_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * num_dims  # the tensor's type id follows its dimensions
    data[at : at + 4] = (250).to_bytes(4, "little")  # a type no gguf package knows
    path.write_bytes(bytes(data))
    message = await refusal(path, log_lines)
    assert str(path) in message and "250" in message and "Q4_K" in message


def test_an_unwritable_gguf_cache_says_what_to_set(tmp_path, default_gguf_path, monkeypatch):
    from app.model.config import ModelLoadError

    not_a_folder = tmp_path / "cache"  # a file where the cache should be: mkdir fails,
    not_a_folder.write_text("")  # as in a read-only home, even for root
    monkeypatch.setattr(gguf_folder, "gguf_cache_dir", lambda: not_a_folder / "gguf")
    with pytest.raises(ModelLoadError, match="cannot write the folder for .*XDG_CACHE_HOME"):
        gguf_folder.gguf_folder(default_gguf_path)


def _rewrite_string(path, old: bytes, new: bytes) -> None:
    """Replace the first length-prefixed occurrence of metadata string `old`."""
    data = bytearray(path.read_bytes())
    at = data.index(len(old).to_bytes(8, "little") + old)
    data[at + 8 : at + 8 + len(old)] = new
    path.write_bytes(bytes(data))


def test_config_json_of_a_gguf_folder(tmp_path, tiny_model_path, gguf_cache):
    path = write_gguf(tiny_model_path, tmp_path / "t.gguf", num_tokens=1024)
    config = json.loads((resolve_model_folder(path) / "config.json").read_text())
    original = json.loads((tiny_model_path / "config.json").read_text())
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert config[key] == original[key], key
