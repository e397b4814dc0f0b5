"""lm-eval (EleutherAI's evaluation harness, from PyPI) as a real client of lamina.

A tiny multiple-choice task, written here (a YAML task config and a local JSONL file;
nothing from a hub), is scored twice: by lm-eval's `local-completions` model against a
live lamina (it asks `/v1/completions` for `echo` with `logprobs` over token ids and
sums the continuation's prompt log-probabilities) and by lm-eval's own `hf` backend on
the same model folder (transformers, fp32). Every choice's log-likelihood must agree
within 1e-4, and the accuracy must be the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.system, pytest.mark.slow]

TASK = "lamina_tiny_mc"
TOLERANCE = 1e-4
# Short continuations (one to three tokens): a log-likelihood is a sum over them.
QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " Berlin", " Madrid"], 0),
    ("Two plus two equals", [" four", " five", " three"], 0),
    ("The sky on a clear day is", [" green", " blue", " red"], 1),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Fahrenheit"], 0),
    ("The opposite of hot is", [" cold", " loud", " tall"], 0),
    ("A week has seven", [" days", " cats", " rivers"], 0),
    ("Bees make", [" honey", " steel", " glass"], 0),
    ("The largest planet in the solar system is", [" Jupiter", " Mars", " Venus"], 0),
    ("Cats like to chase", [" mice", " clouds", " taxes"], 0),
    ("The first month of the year is", [" March", " January", " July"], 1),
]


def write_task(folder: Path) -> None:
    """The task config and its data: `dataset_path: json` reads the local file."""
    data = folder / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n"
            for q, choices, answer in QUESTIONS
        )
    )
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def evaluate(model: str, model_args: str, task_folder: Path) -> tuple[dict[int, list], float]:
    """Each example's per-choice log-likelihoods (by doc id) and the accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_folder)),
        log_samples=True,
        batch_size=4,
    )
    samples = results["samples"][TASK]
    loglikelihoods = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in samples}
    return loglikelihoods, results["results"][TASK]["acc,none"]


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# The server's environment is the test's own (nothing from a hub, no tokenizer threads).
@pytest.mark.lamina_server(model="default_model_path", TOKENIZERS_PARALLELISM="false", **OFFLINE)
def test_lm_eval_scores_lamina_like_its_own_hf_backend(
    default_model_path, tmp_path, monkeypatch, lamina_server
):
    for name, value in {**OFFLINE, "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(name, value)
    write_task(tmp_path)
    model_dir = str(default_model_path)
    server = lamina_server  # started ahead of time, maybe still loading
    try:
        # transformers' side while the server loads
        reference, reference_acc = evaluate(
            "hf", f"pretrained={model_dir},dtype=float32,device=cpu", tmp_path
        )
        server.wait_ready(300)
        served = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        client_args = (
            f"model={served},base_url={server.url}/v1/completions,"
            f"tokenizer_backend=huggingface,tokenizer={model_dir},"
            "num_concurrent=2,max_retries=1"
        )
        scored, scored_acc = evaluate("local-completions", client_args, tmp_path)
    finally:
        server.stop()
    assert sorted(scored) == sorted(reference) == list(range(len(QUESTIONS)))
    for doc_id, expected in reference.items():
        assert scored[doc_id] == pytest.approx(expected, abs=TOLERANCE), doc_id
    assert scored_acc == reference_acc
