"""`lamina bench peers`: its arguments, the precision pairs, the llama.cpp build's cache
key and command lines, the GGUF conversions, the workload's prompts and the report's
medians and ratios. Nothing here builds llama.cpp or runs a server."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.bench import peers, peers_build, peers_gguf, peers_report, peers_servers, peers_workload
from app.bench.peers_report import Sample
from app.bench.spawn import ServerExited

AVX512_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 ht\n"


def sample(series: str, precision: str, streams: int, tok_s: float, round_index=0) -> Sample:
    return Sample(round_index, series, precision, streams, tok_s, 0, 0, [1.0] * 3, [1.0] * 3)


def test_defaults_are_the_issues_workload():
    args = peers.parse_args([])
    assert args.stream_levels == [1, 8, 32] and args.rounds == 2
    assert args.max_tokens == 64 and args.workload == "random"
    assert [p.name for p in args.precision_list] == ["fp32", "fp16", "int8", "int4"]


def test_quick_shortens_only_what_was_not_given():
    args = peers.parse_args(["--quick", "--streams", "1,2,4", "--precisions", "int4"])
    assert args.rounds == 1 and args.requests_per_stream == 1
    assert args.stream_levels == [1, 2, 4]
    assert [p.gguf_type for p in args.precision_list] == ["Q4_0"]


@pytest.mark.parametrize("argv", [["--precisions", "fp8"], ["--streams", "0"], ["--rounds", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises((SystemExit, ValueError)):
        peers.parse_args(argv)


def test_each_precision_pairs_a_lamina_weight_dtype_with_a_gguf_type():
    pairs = {
        name: (p.lamina_weight_dtype, p.gguf_type) for name, p in peers_servers.PRECISIONS.items()
    }
    assert pairs == {
        "fp32": ("float32", "F32"),
        "fp16": ("float16", "F16"),
        "bf16": ("bfloat16", "BF16"),
        "int8": ("int8", "Q8_0"),
        "int4": ("int4", "Q4_0"),
        "int4-q4_1": ("int4", "Q4_1"),
        "int4-q4_k_m": ("int4", "Q4_K_M"),
    }
    # Every GGUF type is one the converter writes or llama-quantize makes from F32.
    makers = set(peers_gguf.CONVERTER_OUTTYPES) | set(peers_gguf.QUANTIZED_FROM_F32)
    assert {p.gguf_type for p in peers_servers.PRECISIONS.values()} <= makers


def test_lamina_env_stores_weights_in_the_precision_on_a_folder_or_a_gguf_file():
    int8 = peers_servers.PRECISIONS["int8"]
    folder_env = peers_servers.lamina_env(int8, 2, Path("/m/smollm2"))
    assert folder_env == {
        "LAMINA_MODEL": "/m/smollm2",
        "LAMINA_WEIGHT_DTYPE": "int8",
        "LAMINA_NUM_THREADS": "2",
    }
    gguf_env = peers_servers.lamina_env(int8, 2, Path("/c/Q8_0.gguf"))
    assert gguf_env["LAMINA_MODEL"] == "/c/Q8_0.gguf" and gguf_env["LAMINA_WEIGHT_DTYPE"] == "int8"
    # 4-bit files in int4, as llama.cpp keeps them, not the int8 that `auto` would pick
    q4_k_m = peers_servers.lamina_env(peers_servers.PRECISIONS["int4-q4_k_m"], 2, Path("/c/x.gguf"))
    assert q4_k_m["LAMINA_WEIGHT_DTYPE"] == "int4"


def test_llama_server_gets_a_slot_per_stream_and_the_same_threads():
    command = peers_servers.llama_server_command(Path("/b/llama-server"), Path("/g.gguf"), 9, 8, 2)
    options = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "/b/llama-server" and "--cont-batching" in command
    assert options["-np"] == "8" and options["-t"] == "2" and options["-tb"] == "2"
    assert int(options["-c"]) == 8 * peers_servers.CONTEXT_PER_SLOT
    assert options["--host"] == "127.0.0.1" and options["--port"] == "9"


def test_the_build_key_follows_the_version_and_the_native_instruction_sets():
    flags = peers_build.cpu_flags(AVX512_CPU)
    assert {"avx512f", "avx512_bf16", "fpu"} <= flags
    key = peers_build.build_key("0.3.36", flags)
    assert key.startswith("0.3.36-")
    assert key == peers_build.build_key("0.3.36", flags | {"ht", "some_unrelated_flag"})
    assert key != peers_build.build_key("0.3.36", flags - {"avx512f"})
    assert key != peers_build.build_key("0.3.35", flags)


def test_the_build_is_cpu_only_offline_and_makes_only_the_two_tools(tmp_path):
    configure, build = peers_build.cmake_commands(tmp_path / "src", tmp_path / "build", 2)
    assert configure[1:5] == ["-S", str(tmp_path / "src"), "-B", str(tmp_path / "build")]
    for option in ("-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF"):
        assert option in configure
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in configure  # else it downloads the web UI
    assert build[-3:] == ["--target", "llama-server", "llama-quantize"]
    assert build[build.index("-j") + 1] == "2"


def test_a_cached_build_is_found_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(peers_build, "cpu_flags", lambda: {"avx2"})
    home = tmp_path / "lamina" / "llama.cpp" / peers_build.build_key("9.9.9", {"avx2"})
    for target in peers_build.TARGETS:
        (home / "bin").mkdir(parents=True, exist_ok=True)
        (home / "bin" / target).write_text("binary")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached build must not run anything")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    llama = peers_build.find_or_build("9.9.9")
    assert llama.server == home / "bin" / "llama-server"
    assert llama.quantize == home / "bin" / "llama-quantize"
    assert llama.converter == (
        home / "src" / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    )


def llama_at(tmp_path: Path) -> peers_build.LlamaCpp:
    return peers_build.LlamaCpp(
        "9.9.9",
        tmp_path / "llama.cpp",
        tmp_path / "bin/llama-server",
        tmp_path / "bin/llama-quantize",
    )


def test_conversion_command_lines(tmp_path):
    llama = llama_at(tmp_path)
    folder, out = tmp_path / "model", tmp_path / "F16.gguf"
    command = peers_gguf.converter_command(llama, folder, "Q8_0", out)
    assert command[1:] == [
        str(tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"),
        str(folder),
        "--outtype",
        "q8_0",
        "--outfile",
        str(out),
    ]
    quantize = peers_gguf.quantize_command(llama, tmp_path / "F32.gguf", "Q4_0", out)
    assert quantize == [str(llama.quantize), str(tmp_path / "F32.gguf"), str(out), "Q4_0"]
    env = peers_gguf.converter_env(llama)
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path / "llama.cpp" / "gguf-py")


def test_a_converted_file_is_cached_by_the_folders_content(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = peers_gguf.model_content_hash(folder)
    assert first == peers_gguf.model_content_hash(folder)
    (folder / "config.json").write_text('{"changed": 1}')
    assert peers_gguf.model_content_hash(folder) != first

    into = tmp_path / "cache"
    into.mkdir()
    (into / "Q4_0.gguf").write_text("gguf")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("converted again"))
    assert peers_gguf.ensure_gguf(llama_at(tmp_path), folder, "Q4_0", into) == into / "Q4_0.gguf"


def test_server_order_alternates_from_round_to_round():
    series = ["lamina", "llama.cpp"]
    assert peers.series_order(series, 0) == ["lamina", "llama.cpp"]
    assert peers.series_order(series, 1) == ["llama.cpp", "lamina"]


def test_prompts_are_64_words_reproducible_and_the_same_for_both_servers():
    args = peers.parse_args([])
    bodies = peers.level_bodies(args, "m", round_index=1, streams=8)
    prompts = [body["prompt"] for body in bodies]
    assert len(prompts) == 16 and all(len(p.split()) == 64 for p in prompts)
    assert bodies == peers.level_bodies(args, "m", round_index=1, streams=8)
    assert bodies != peers.level_bodies(args, "m", round_index=0, streams=8)
    assert len(peers.level_bodies(args, "m", 0, 1)) == 4  # a level sends at least 4 requests
    body = bodies[0]
    assert body["ignore_eos"] is True and body["stream"] is True and body["temperature"] == 0
    assert body["max_tokens"] == 64 and body["model"] == "m"


def test_the_repetitive_workload_asks_each_request_to_rewrite_its_own_passage():
    args = peers.parse_args(["--workload", "repetitive"])
    assert args.max_tokens == peers.REPETITIVE_MAX_TOKENS
    bodies = peers.level_bodies(args, "m", round_index=0, streams=1)
    texts = [body["messages"][0]["content"] for body in bodies]
    assert len(texts) == 4 and len(set(texts)) == 4
    assert all(body["ignore_eos"] and body["temperature"] == 0 for body in bodies)
    # Each opens with its own reference: no request's passage is another's cached prefix.
    assert len({text.split(")")[0] for text in texts}) == 4
    assert all(
        "lighthouse" in t or "Bread" in t or "glacier" in t or "libraries" in t for t in texts
    )


def test_repetitive_series_add_lamina_with_speculation():
    args = peers.parse_args(["--workload", "repetitive", "--lamina-gguf"])
    assert peers.lamina_series(args) == ["lamina", "lamina-gguf", "lamina-spec"]
    assert peers.lamina_series(peers.parse_args([])) == ["lamina"]


def test_speculation_outputs_are_compared_request_by_request():
    texts = {
        ("lamina", 0, "fp32", 1): ["a", "b"],
        ("lamina-spec", 0, "fp32", 1): ["a", "c"],
        ("llama.cpp", 0, "fp32", 1): ["x", "y"],
    }
    assert peers.speculation_identical(texts) == {"requests": 2, "identical": 1}
    assert peers.speculation_identical({("lamina", 0, "fp32", 1): ["a"]}) is None
    lines = peers_report.speculation_lines({("fp32", 1): 2.0, ("fp32", 8): 1.2}, None)
    assert lines == [
        "fp32, 1 stream(s): speculation on/off 2.00x",
        "fp32, 8 stream(s): speculation on/off 1.20x",
    ]


def test_medians_ratios_and_their_lines():
    samples = [
        sample("lamina", "int8", 1, 30.0, 0),
        sample("lamina", "int8", 1, 50.0, 1),
        sample("lamina", "int8", 1, 40.0, 2),
        sample("llama.cpp", "int8", 1, 20.0, 0),
        sample("llama.cpp", "int8", 1, 30.0, 1),
        sample("lamina", "fp32", 32, 100.0),
        sample("llama.cpp", "fp32", 32, 80.0),
    ]
    med = peers_report.medians(samples)
    assert med[("lamina", "int8", 1)] == 40.0 and med[("llama.cpp", "int8", 1)] == 25.0
    ratios = peers_report.ratios(med)
    assert ratios == {("int8", 1): 1.6, ("fp32", 32): 1.25}
    assert peers_report.ratio_lines(ratios) == [
        "fp32, 32 stream(s): lamina/llama.cpp 1.25x",  # fp32 before int8, as in the table
        "int8, 1 stream(s): lamina/llama.cpp 1.60x",
    ]
    table = peers_report.markdown_table(samples, ["lamina", "llama.cpp"])
    rows = table.splitlines()
    assert rows[0] == "| precision | streams | lamina | llama.cpp | lamina / llama.cpp |"
    assert rows[2] == "| fp32 | 32 | 100.0 | 80.0 | 1.25x |"  # fp32 before int8
    assert rows[3] == "| int8 | 1 | 40.0 (30.0-50.0) | 25.0 (20.0-30.0) | 1.60x |"


def test_an_extra_series_gets_its_own_ratio_column():
    samples = [
        sample("lamina", "int4", 8, 90.0),
        sample("lamina-gguf", "int4", 8, 60.0),
        sample("llama.cpp", "int4", 8, 30.0),
    ]
    table = peers_report.markdown_table(samples, ["lamina", "lamina-gguf", "llama.cpp"])
    assert table.splitlines()[2] == "| int4 | 8 | 90.0 | 60.0 | 30.0 | 3.00x | 2.00x |"


def test_the_machine_is_described():
    machine = peers_report.machine()
    assert machine["cores_usable"] >= 1 and machine["cpu"]
    assert set(machine["flags"]) <= set(peers_build.NATIVE_FLAGS)


def test_the_warm_up_prompt_is_no_levels_prompt():
    # random.Random(-1) is random.Random(1): a negative seed would repeat level 1's
    # first prompt and hand both servers a cached prefix.
    warm_up = peers_workload.word_prompts(1, seed="warm-up")[0]
    args = peers.parse_args([])
    for round_index in range(3):
        for streams in (1, 8, 32):
            bodies = peers.level_bodies(args, "m", round_index, streams)
            assert warm_up not in {body["prompt"] for body in bodies}


def test_a_llama_server_that_crashes_at_load_is_run_without_repacking(tmp_path, monkeypatch):
    """llama-server 0.3.36 segfaults at load on Q8_0 on an AMX Xeon with its default
    weight repacking: that precision then runs with --no-repack, said once, and recorded."""
    started = []  # (gguf name, extra flags) of every start

    @contextlib.contextmanager
    def fake_server(server, gguf, streams, threads, log_path, extra=()):
        started.append((gguf.name, extra))
        if gguf.name == "q8.gguf" and not extra:
            raise ServerExited("llama-server exited with -11 before it was ready")
        yield f"http://127.0.0.1:{streams}"

    monkeypatch.setattr(peers, "llama_server", fake_server)
    args = SimpleNamespace(out=tmp_path / "peers.json", threads=2)
    llama = peers_build.LlamaCpp("0.3.36", None, Path("/b/llama-server"), None)
    int8, fp32 = peers_servers.parse_precisions("int8,fp32")
    with contextlib.ExitStack() as stack:
        assert peers.enter_llama_server(stack, int8, 8, args, llama, Path("/q8.gguf")).endswith(
            ":8"
        )
        peers.enter_llama_server(stack, int8, 32, args, llama, Path("/q8.gguf"))
        peers.enter_llama_server(stack, fp32, 1, args, llama, Path("/f32.gguf"))
    no_repack = ("--no-repack",)
    assert started == [
        ("q8.gguf", ()),
        ("q8.gguf", no_repack),
        ("q8.gguf", no_repack),
        ("f32.gguf", ()),
    ]
    (why,) = llama.flags_changed.values()
    assert list(llama.flags_changed) == ["int8"]
    assert "exited with -11" in why and "--no-repack" in why
