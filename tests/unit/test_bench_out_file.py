"""`--out` of the one-file benchmarks: a folder is written into, a wrong name is refused
when the arguments are parsed, not after the run."""

import argparse
from pathlib import Path

import pytest

from app.bench import fleet_bench, peers, perplexity
from app.bench.out_file import json_out_argument

DEFAULT = Path("bench_results/peers.json")


def test_a_json_file_is_taken_as_given(tmp_path):
    assert json_out_argument(DEFAULT)(str(tmp_path / "x.json")) == tmp_path / "x.json"


def test_an_existing_folder_gets_the_default_name(tmp_path):
    assert json_out_argument(DEFAULT)(str(tmp_path)) == tmp_path / "peers.json"


def test_a_new_folder_written_with_a_slash_gets_the_default_name(tmp_path):
    assert json_out_argument(DEFAULT)(f"{tmp_path}/new/") == tmp_path / "new" / "peers.json"


def test_another_suffix_is_refused(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="a .json file or a folder"):
        json_out_argument(DEFAULT)(str(tmp_path / "results.txt"))


def test_a_new_folder_without_a_slash_is_refused_saying_how_to_name_one(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="written with a trailing /"):
        json_out_argument(DEFAULT)(str(tmp_path / "results"))


@pytest.mark.parametrize(
    ("parse", "name"),
    [
        (peers.parse_args, "peers.json"),
        (fleet_bench.parse_args, "fleet_bench.json"),
        (perplexity.parse_args, "perplexity.json"),
    ],
)
def test_each_command_writes_into_a_folder(parse, name, tmp_path):
    assert parse(["--out", str(tmp_path)]).out == tmp_path / name
