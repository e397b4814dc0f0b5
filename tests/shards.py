"""`make test`'s runner: the whole suite as two pytest processes at once, on disjoint
sets of test folders, each process with its own temporary folder and server pool.

Why: one pytest process keeps about 1.25 of 2 cores busy (measured: 16 min of CPU in a
13-minute run): its tests wait on servers that load, on HTTP round trips, on compilers
and on subprocesses, and the other core idles meanwhile. Two processes fill those waits.
The folders are split by their measured time (docs/testing.md); the second shard is
every test folder the first does not name, so a new folder is never left out.

`python -m tests.shards [pytest arguments]`: runs both shards, each line of their output
prefixed with the shard's number, and exits with the first failure's status. Arguments
that name test paths, `LAMINA_TEST_SHARDS=1`, or a machine with one core run one plain
pytest process instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

NO_TESTS_COLLECTED = 5  # pytest's exit status
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# The first shard's folders; the second takes the rest. About half of the suite's time
# each (docs/testing.md, "Two pytest processes"): in a sharded run on a loaded 2-core
# machine, api + attack + families + unit took 976 s and the rest 1,438 s, of which
# tests/engine about 250 s, so it moved to the first.
FIRST_SHARD = ("api", "attack", "engine", "families", "unit")


def folders_with_tests() -> list[str]:
    """Every folder under tests/ that holds test files, by name."""
    return sorted(
        path.name for path in TESTS.iterdir() if path.is_dir() and any(path.rglob("test_*.py"))
    )


def shards() -> tuple[list[str], list[str]]:
    """The two shards' paths, relative to the repository root: FIRST_SHARD's folders,
    then every other test folder and the test files directly under tests/."""
    folders = folders_with_tests()
    first = [f"tests/{name}" for name in folders if name in FIRST_SHARD]
    second = [f"tests/{name}" for name in folders if name not in FIRST_SHARD]
    second += sorted(f"tests/{path.name}" for path in TESTS.glob("test_*.py"))
    return first, second


def names_paths(args: list[str]) -> bool:
    """Whether pytest arguments select tests by path (then the caller chose them)."""
    return any(not arg.startswith("-") and Path(arg.split("::")[0]).exists() for arg in args)


def run_sharded(args: list[str]) -> int:
    """Both shards at once; their output line by line as it comes, prefixed."""
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="lamina-shards-") as scratch:
        processes = []
        for index, paths in enumerate(shards(), start=1):
            command = [sys.executable, "-m", "pytest", *paths, *args]
            command += ["--basetemp", str(Path(scratch) / f"shard{index}")]
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            pump = threading.Thread(target=_echo, args=(process, f"[{index}] ", lock))
            pump.start()
            processes.append((process, pump))
        statuses = []
        for process, pump in processes:
            statuses.append(process.wait())
            pump.join()
    print(f"shards' exit statuses: {statuses}", flush=True)
    return combined_status(statuses)


def combined_status(statuses: list[int]) -> int:
    """The first failure; a shard that selected no test (pytest's 5, e.g. `-k` matching
    only the other shard's tests) fails the run only when every shard did."""
    if all(status == NO_TESTS_COLLECTED for status in statuses):
        return NO_TESTS_COLLECTED
    return next((s for s in statuses if s not in (0, NO_TESTS_COLLECTED)), 0)


def _echo(process: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in process.stdout:
        with lock:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


def main(argv: list[str]) -> int:
    single = os.environ.get("LAMINA_TEST_SHARDS") == "1" or len(os.sched_getaffinity(0)) < 2
    if single or names_paths(argv):
        return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=ROOT)
    return run_sharded(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
