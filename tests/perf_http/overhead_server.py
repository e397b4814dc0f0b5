"""`python -m tests.perf_http.overhead_server --port P`: lamina over a SleepRunner.

The real app, real Engine, scheduler, detokenizer and tokenizer; only the model is
replaced by a sleep (see sleep_runner.py). Used by measure_overhead.py.
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from app.config import load_settings
from app.engine.engine import Engine
from app.logging_setup import configure_logging
from app.main import LoadedEngine, create_app
from app.server.uvicorn_config import uvicorn_config
from app.tokenizer import Tokenizer
from tests.perf_http.sleep_runner import SAMPLE_TEXT, SleepRunner


def build_app(args: argparse.Namespace):
    overrides = (
        {} if args.prefill_cap is None else {"max_prefill_tokens_while_decoding": args.prefill_cap}
    )
    settings = load_settings(log_level="warning", **overrides)

    def loader(_settings) -> LoadedEngine:
        engine_tokenizer = Tokenizer(settings.model)
        token_ids = engine_tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)
        runner = SleepRunner(
            token_ids,
            fixed_s=args.step_ms / 1000,
            per_seq_s=args.per_seq_ms / 1000,
            per_token_s=args.per_token_ms / 1000,
        )
        engine = Engine(runner, engine_tokenizer, settings)
        return LoadedEngine(engine, Tokenizer(settings.model), "cpu", "float32")

    def on_fatal(reason: str) -> None:
        print(f"overhead_server: loading failed: {reason}", flush=True)
        os._exit(1)

    return settings, create_app(settings, loader=loader, on_fatal=on_fatal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-ms", type=float, default=5.0, help="fixed time of a step")
    parser.add_argument("--per-seq-ms", type=float, default=0.0, help="added per sequence")
    parser.add_argument("--per-token-ms", type=float, default=0.0, help="added per token")
    parser.add_argument("--prefill-cap", type=int, help="prefill tokens while decoding; 0: none")
    args = parser.parse_args()
    settings, app = build_app(args)
    configure_logging(settings.log_format, settings.log_level)
    # The production server's uvicorn configuration (connection guard included), so its
    # per-token cost is part of what is measured.
    config = uvicorn_config(
        app, settings.model_copy(update={"host": "127.0.0.1", "port": args.port})
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
