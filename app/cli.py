"""The `lamina` command: `weights`, `serve`, `bench engine|serve|kernels|fleet|peers|perplexity`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_weights(args: argparse.Namespace) -> int:
    from app.weights import WeightsError, prepare_default_model

    try:
        prepare_default_model(target=args.target, force=args.force)
    except WeightsError as exc:
        print(f"lamina weights: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from app.config import SettingsError, load_settings
    from app.main import serve

    try:
        settings = load_settings(host=args.host, port=args.port, model=args.model)
    except SettingsError as exc:
        print(f"lamina serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_target == "engine":
        from app.bench.engine_bench import main as bench_engine

        return bench_engine(args.rest)
    if args.bench_target == "kernels":
        from app.bench.kernel_bench import main as bench_kernels

        return bench_kernels(args.rest)
    if args.bench_target == "fleet":
        from app.bench.fleet_bench import main as bench_fleet

        return bench_fleet(args.rest)
    if args.bench_target == "peers":
        from app.bench.peers import main as bench_peers

        return bench_peers(args.rest)
    if args.bench_target == "perplexity":
        from app.bench.perplexity import main as bench_perplexity

        return bench_perplexity(args.rest)
    from app.bench.serve_bench import main as bench_serve

    return bench_serve(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    weights = sub.add_parser("weights", help="prepare the default model in model_weights/")
    weights.add_argument("--force", action="store_true", help="rebuild even when present")
    weights.add_argument("--target", type=Path, help="folder to fill (default: model_weights/...)")
    weights.set_defaults(func=_cmd_weights)

    serve = sub.add_parser("serve", help="serve the HTTP API (settings from LAMINA_* env)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="HF model folder, .gguf file or hub id (LAMINA_MODEL)")
    serve.set_defaults(func=_cmd_serve)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: `engine` (offline), `serve` (HTTP), `kernels` (CPU kernels), "
        "`fleet` (replicas behind nginx and a cache-aware router), "
        "`peers` (against llama.cpp's server, precision by precision), "
        "`perplexity` (quality beside llama.cpp's, precision by precision)",
    )
    bench.add_argument(
        "bench_target", choices=["engine", "serve", "kernels", "fleet", "peers", "perplexity"]
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
