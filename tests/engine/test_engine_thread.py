"""The threaded Engine and its asyncio bridge, over the fake runner (milliseconds).

Every test here is also checked by conftest's no_kv_block_left_referenced: once the
engine thread has ended, no request and no referenced KV block is left.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.config import load_settings
from app.core import FinishReason, SamplingParams
from app.engine.engine import Engine, EngineDeadError
from tests.unit.fakes import FakeRunner, FakeTokenizer

TOK = FakeTokenizer()


class SlowRunner(FakeRunner):
    """Takes 10 ms a step, so a test can act while a request is surely mid-flight."""

    def execute(self, batch):  # noqa: ANN001, ANN201
        time.sleep(0.01)
        return super().execute(batch)


class GatedRunner(FakeRunner):
    """Records every step, and can hold one step mid-execute until the test lets it go.

    Each record is taken on the engine thread at the start of execute(), after the step
    was scheduled: (request ids in the batch, referenced blocks, blocks per running
    request).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.core = None  # set once the Engine exists
        self.steps: list[tuple[set[str], int, dict[str, int]]] = []
        self.hold_next = threading.Event()
        self.held = threading.Event()
        self.go = threading.Event()

    def execute(self, batch):  # noqa: ANN001, ANN201
        held: dict[str, int] = {}
        for seq in self.core.scheduler.running:
            held[seq.request_id] = held.get(seq.request_id, 0) + len(seq.block_table)
        in_batch = {s.seq.request_id for s in batch.seqs}
        self.steps.append((in_batch, self.core.block_manager.num_used_blocks, held))
        if self.hold_next.is_set():
            self.hold_next.clear()
            self.held.set()
            assert self.go.wait(5.0), "the test never released the step"
        return super().execute(batch)


def make_engine(**overrides) -> tuple[Engine, FakeRunner]:
    runner = FakeRunner(block_size=4, num_blocks=64, max_model_len=256)
    settings = load_settings(environ={}, max_num_batched_tokens=32, max_num_seqs=8, **overrides)
    return Engine(runner, TOK, settings), runner


async def collect(stream) -> dict[int, list]:
    by_choice: dict[int, list] = {}
    async for delta in stream:
        by_choice.setdefault(delta.index, []).append(delta)
    return by_choice


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def params() -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=0.0)


@pytest.mark.anyio
async def test_generate_streams_every_choice_to_its_end(params):
    engine, _ = make_engine()
    engine.start()
    try:
        result = await collect(engine.add_request("a", TOK.encode("hello"), params, n=2))
        assert sorted(result) == [0, 1]
        for deltas in result.values():
            assert deltas[-1].finish_reason is FinishReason.LENGTH
            assert deltas[-1].usage.completion_tokens == 12
            assert sum(len(d.token_ids) for d in deltas) == 12
        await wait_for(lambda: engine.stats().num_running == 0)
        assert engine.core.block_manager.num_used_blocks == 0
    finally:
        engine.shutdown()


@pytest.mark.anyio
async def test_abort_frees_blocks_before_the_next_step_is_scheduled():
    runner = GatedRunner(block_size=4, num_blocks=64, max_model_len=256)
    settings = load_settings(environ={}, max_num_batched_tokens=32, max_num_seqs=8)
    engine = Engine(runner, TOK, settings)
    runner.core = engine.core
    runner.hold_next.set()  # the first step waits mid-execute until runner.go
    engine.start()
    try:
        victim = engine.add_request("a", TOK.encode("x" * 20), SamplingParams(max_tokens=200))
        other = engine.add_request("b", TOK.encode("y" * 9), SamplingParams(max_tokens=40))
        assert await asyncio.to_thread(runner.held.wait, 5.0)
        in_flight = len(runner.steps)  # the held step is runner.steps[in_flight - 1]
        assert "a" in runner.steps[-1][0] and runner.steps[-1][2]["a"] > 0  # "a" holds blocks
        engine.abort("a")
        runner.go.set()
        victim_deltas = (await collect(victim))[0]
        assert victim_deltas[-1].finish_reason is FinishReason.ABORT
        assert (await collect(other))[0][-1].finish_reason is FinishReason.LENGTH
        after = runner.steps[in_flight:]
        assert after, "no step ran after the abort"
        # The step in flight was the last to see "a": the abort was applied before the
        # next step was scheduled, and by then "a" held no block at all.
        for in_batch, used_blocks, held in after:
            assert "a" not in in_batch and "a" not in held
            assert used_blocks == sum(held.values())
        assert after[0][2] == {"b": after[0][1]}
    finally:
        engine.shutdown()


@pytest.mark.anyio
async def test_abort_ends_the_stream_at_once_with_its_reason_and_frees_blocks():
    runner = GatedRunner(block_size=4, num_blocks=64, max_model_len=256)
    engine = Engine(runner, TOK, load_settings(environ={}, max_num_seqs=8))
    runner.core = engine.core
    runner.hold_next.set()  # the engine thread is stuck in a step while we abort
    engine.start()
    try:
        stream = engine.add_request("a", TOK.encode("x" * 20), SamplingParams(max_tokens=200), n=2)
        assert await asyncio.to_thread(runner.held.wait, 5.0)
        engine.abort("a", "the deadline passed")
        ended = await asyncio.wait_for(collect(stream), 1.0)  # the step is still held
        for deltas in ended.values():
            assert deltas[-1].finish_reason is FinishReason.ABORT
            assert deltas[-1].error == "the deadline passed"
        runner.go.set()
        await wait_for(lambda: not engine.core.has_unfinished())
        assert engine.core.block_manager.num_used_blocks == 0
    finally:
        runner.go.set()
        engine.shutdown()


@pytest.mark.anyio
async def test_closing_a_stream_aborts_and_frees_blocks():
    engine, _ = make_engine()
    engine.start()
    try:
        stream = engine.add_request("long", TOK.encode("x" * 20), SamplingParams(max_tokens=200))
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()
        await wait_for(lambda: not engine.core.has_unfinished())
        assert engine.core.block_manager.num_used_blocks == 0
    finally:
        engine.shutdown()


@pytest.mark.anyio
async def test_a_crashed_engine_thread_fails_waiters_and_refuses_new_work(params):
    engine, _ = make_engine()
    engine.start()
    long = SamplingParams(max_tokens=250, temperature=0.0)
    streams = [engine.add_request(f"r{i}", TOK.encode(f"prompt {i}"), long) for i in range(3)]
    engine.crash_for_test()
    finals = [(await collect(s))[0][-1] for s in streams]
    assert all(d.finish_reason in (FinishReason.ERROR, FinishReason.LENGTH) for d in finals)
    assert any(d.finish_reason is FinishReason.ERROR and "engine" in d.error for d in finals)
    await wait_for(lambda: not engine.is_alive)
    with pytest.raises(EngineDeadError):
        engine.add_request("late", TOK.encode("late"), params)


@pytest.mark.anyio
async def test_shutdown_ends_unfinished_requests_with_an_error():
    settings = load_settings(environ={}, max_num_batched_tokens=32)
    engine = Engine(SlowRunner(block_size=4, num_blocks=64, max_model_len=256), TOK, settings)
    engine.start()
    stream = engine.add_request("r", TOK.encode("abc"), SamplingParams(max_tokens=250))
    await stream.__anext__()
    await asyncio.to_thread(engine.shutdown)
    deltas = (await collect(stream))[0]
    assert deltas[-1].finish_reason is FinishReason.ERROR


@pytest.mark.anyio
async def test_a_fault_in_one_request_fails_it_alone(params):
    engine, _ = make_engine(fault_injection_marker="BOOM")
    engine.start()
    try:
        bad = engine.add_request("bad", TOK.encode("BOOM here"), params)
        good = [engine.add_request(f"g{i}", TOK.encode(f"fine {i}"), params) for i in range(3)]
        bad_final = (await collect(bad))[0][-1]
        assert bad_final.finish_reason is FinishReason.ERROR
        assert "injected fault" in bad_final.error
        for stream in good:
            final = (await collect(stream))[0][-1]
            assert final.finish_reason is FinishReason.LENGTH
        assert engine.is_alive
    finally:
        engine.shutdown()


@pytest.mark.anyio
async def test_a_runner_exception_is_isolated_to_its_request(params):
    runner = FakeRunner(
        block_size=4, num_blocks=64, max_model_len=256, fail_token_id=TOK.encode("!")[0]
    )
    settings = load_settings(environ={}, max_num_batched_tokens=64)
    engine = Engine(runner, TOK, settings)
    engine.start()
    try:
        bad = engine.add_request("bad", TOK.encode("fails!"), params)
        good = engine.add_request("good", TOK.encode("works"), params)
        assert (await collect(bad))[0][-1].finish_reason is FinishReason.ERROR
        assert (await collect(good))[0][-1].finish_reason is FinishReason.LENGTH
    finally:
        engine.shutdown()


@pytest.mark.anyio
async def test_a_prompt_that_fills_the_context_is_an_error_not_a_hang(params):
    engine, _ = make_engine()
    engine.start()
    try:
        final = (await collect(engine.add_request("big", [5] * 300, params)))[0][-1]
        assert final.finish_reason is FinishReason.ERROR and "context window" in final.error
    finally:
        engine.shutdown()
