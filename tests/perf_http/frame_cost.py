"""Cost of one streamed chat token's frame: `python -m tests.perf_http.frame_cost`.

Compares, interleaved in one process, the template frame (sse.TextFrames) with the
pydantic chunk it stands for, and with `--old-src CHECKOUT` also the hand-written
template of a checkout that still has app/api/stream_frames.py (e.g. e44f1f5). Prints
the median and best microseconds per frame over the rounds; every variant is first
checked to write the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from app.api.schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta
from app.api.sse import TextFrames, sse_event

RESPONSE_ID, CREATED, MODEL = "chatcmpl-3f2a9c", 1764700000, "smollm2-135m-instruct"
TEXTS = [" the", " quick", " brown", " fox", "é", "\n", ' "x"']


def chunk(index: int, text: str) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text))
    return ChatCompletionChunk(id=RESPONSE_ID, created=CREATED, model=MODEL, choices=[choice])


def old_template(src: Path) -> Callable[[str], bytes]:
    spec = importlib.util.spec_from_file_location("old_frames", src / "app/api/stream_frames.py")
    assert spec is not None and spec.loader is not None, f"no stream_frames.py in {src}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    frames = module.ChatFrames(RESPONSE_ID, CREATED, MODEL)
    return lambda text: frames.content(0, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", type=Path, help="a checkout with stream_frames.py")
    parser.add_argument("--frames", type=int, default=20_000, help="frames per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    text_frames = TextFrames(chunk)
    variants: dict[str, Callable[[str], bytes]] = {
        "TextFrames": lambda text: text_frames.frame(0, text),
        "pydantic chunk": lambda text: sse_event(chunk(0, text)),
    }
    if args.old_src:
        variants["old template"] = old_template(args.old_src)
    for text in TEXTS:
        assert len({variant(text) for variant in variants.values()}) == 1, text
    texts = (TEXTS * (args.frames // len(TEXTS) + 1))[: args.frames]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            start = time.perf_counter()
            for text in texts:
                variant(text)
            times[name].append((time.perf_counter() - start) / len(texts) * 1e6)
    for name, values in times.items():
        print(f"{name:>15}: {statistics.median(values):6.2f} us per frame (best {min(values):.2f})")


if __name__ == "__main__":
    main()
