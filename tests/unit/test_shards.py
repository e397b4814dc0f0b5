"""make test's two pytest processes: every test folder in exactly one of them."""

from __future__ import annotations

from tests.shards import FIRST_SHARD, combined_status, folders_with_tests, names_paths, shards


def test_every_test_folder_is_in_exactly_one_shard():
    first, second = shards()
    folders = [f"tests/{name}" for name in folders_with_tests()]
    assert sorted(p for p in first + second if p in folders) == folders
    assert not set(first) & set(second)
    assert first == [f"tests/{name}" for name in sorted(FIRST_SHARD)]  # each one exists
    assert "tests/engine" in first and "tests/perf" in second


def test_paths_in_the_arguments_mean_one_plain_run():
    assert names_paths(["tests/unit", "-q"])
    assert names_paths(
        ["tests/unit/test_shards.py::test_paths_in_the_arguments_mean_one_plain_run"]
    )
    assert not names_paths(["-q", "--durations=40", "-k", "memory"])
    assert not names_paths(["-rfE"])


def test_a_shard_with_nothing_selected_fails_only_if_both_are_empty():
    assert combined_status([0, 0]) == 0
    assert combined_status([5, 0]) == 0 and combined_status([0, 5]) == 0
    assert combined_status([5, 5]) == 5
    assert combined_status([0, 1]) == 1 and combined_status([1, 5]) == 1
    assert combined_status([2, 1]) == 2
