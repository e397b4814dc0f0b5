"""A baseline for `lamina bench serve`: transformers' `generate` behind OpenAI routes.

This is what a team would build without a serving engine: requests are grouped into
static, left-padded batches (up to --max-batch, whatever is waiting when the previous
batch ends) and each batch runs `generate` to completion. Tokens are streamed as they
come through a batch-wide streamer. Greedy only; enough for the benchmark workload.
Run: `python -m app.bench.baseline_server --port 8001`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from app.config import load_settings


@dataclass
class _Pending:
    prompt: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)


class _BatchStreamer:
    """Receives each step's new tokens for the whole batch from `generate`."""

    def __init__(self, batch: list[_Pending]) -> None:
        self.batch = batch
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # the first call carries the prompt ids
            self.seen_prompt = True
            return
        for pending, token in zip(self.batch, value.view(-1).tolist()):
            pending.loop.call_soon_threadsafe(pending.out.put_nowait, token)

    def end(self) -> None:
        for pending in self.batch:
            pending.loop.call_soon_threadsafe(pending.out.put_nowait, None)


class BaselineWorker:
    def __init__(self, model_dir, max_batch: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_batch = max_batch
        self.inbox: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self.model = None  # set by the worker thread
        loaded = threading.Event()
        threading.Thread(target=self._run, args=(model_dir, loaded), daemon=True).start()
        loaded.wait()
        if self.model is None:
            raise RuntimeError(f"the baseline could not load {model_dir} (see the log above)")

    def _run(self, model_dir, loaded: threading.Event) -> None:
        # Load on the thread that generates: torch's OpenMP workers belong to the thread
        # that first ran parallel work, and a second pool on the same cores slows every
        # step (docs/performance-http.md). The baseline gets the same care as lamina.
        try:
            from transformers import AutoModelForCausalLM

            from app.model.gguf_folder import transformers_kwargs

            extra = transformers_kwargs(Path(model_dir))  # a .gguf's folder
            self.model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, **extra
            )
            self.model.eval()
        finally:
            loaded.set()
        while True:
            batch = [self.inbox.get()]
            time.sleep(0.01)  # let a burst of simultaneous arrivals join the batch
            while len(batch) < self.max_batch and not self.inbox.empty():
                batch.append(self.inbox.get())
            self._generate(batch)

    def _generate(self, batch: list[_Pending]) -> None:
        width = max(len(p.prompt) for p in batch)
        ids = torch.tensor([[2] * (width - len(p.prompt)) + p.prompt for p in batch])
        mask = torch.tensor([[0] * (width - len(p.prompt)) + [1] * len(p.prompt) for p in batch])
        new = max(p.max_tokens for p in batch)
        with torch.no_grad():
            self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=2,
                streamer=_BatchStreamer(batch),
            )


def build_app(worker: BaselineWorker, model_name: str) -> FastAPI:
    app = FastAPI(title="transformers baseline")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompt = worker.tokenizer.encode(prompt)
        pending = _Pending(prompt, int(body.get("max_tokens", 16)), asyncio.get_running_loop())
        worker.inbox.put(pending)
        return StreamingResponse(_sse(pending, worker, model_name), media_type="text/event-stream")

    return app


async def _sse(pending: _Pending, worker: BaselineWorker, model_name: str):
    request_id = f"cmpl-{uuid.uuid4().hex}"
    count = 0
    while (token := await pending.out.get()) is not None:
        if count < pending.max_tokens:
            count += 1
            choice = {"index": 0, "text": worker.tokenizer.decode([token]), "finish_reason": None}
            chunk = {"id": request_id, "model": model_name, "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n"
    usage = {
        "prompt_tokens": len(pending.prompt),
        "completion_tokens": count,
        "total_tokens": len(pending.prompt) + count,
    }
    yield f"data: {json.dumps({'id': request_id, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    settings = load_settings().with_model_folder()  # a .gguf file or hub id too
    worker = BaselineWorker(settings.model, args.max_batch)
    uvicorn.run(
        build_app(worker, settings.model_name),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
