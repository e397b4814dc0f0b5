"""`lamina bench serve --structured` against the real server: a free and a constrained
series at every level, each request writing exactly --output-len tokens, and the
schema's compile timed cold, cached and without a schema."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from app.bench.serve_bench import parse_args, sweep_interleaved
from tests.api.conftest import LiveServer

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_free_and_constrained_series_at_each_level(
    api_server: LiveServer, tmp_path, capsys
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    args = parse_args(
        ["--structured", str(path), "--concurrency", "1,3", "--prompt-len", "12"]
        + ["--output-len", "6", "--requests-per-client", "1", "--seed", "41"]
    )
    runs = asyncio.run(sweep_interleaved({"lamina": api_server.url}, args))
    assert [run.name for run in runs] == ["lamina free", "lamina json"]
    for run in runs:
        assert [level.concurrency for level in run.levels] == [1, 3]
        for level in run.levels:
            assert (level.num_requests, level.num_errors) == (level.concurrency, 0)
            assert level.output_tok_s * level.duration_s == pytest.approx(level.concurrency * 6)
    printed = capsys.readouterr().out
    timing = r"cold [0-9.]+ ms, cached [0-9.]+ ms, without [0-9.]+ ms"
    assert re.search(timing, printed), printed


def test_structured_refuses_the_transformers_baseline() -> None:
    from app.bench.serve_bench import main

    with pytest.raises(SystemExit, match="baseline"):
        main(["--structured", "--baseline", "transformers"])
