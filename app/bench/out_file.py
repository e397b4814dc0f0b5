"""`--out` of the benchmarks that write one JSON file (and a table and a plot beside it).

`lamina bench serve --out` names a folder; the others name a file. A folder given to one
of these means "write into it", under the command's own file name, rather than a
failure when the results are written, after the whole run.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_json_out(parser: argparse.ArgumentParser, default: Path) -> None:
    """`--out`: where the command writes its JSON (default `default`), or a folder for it."""
    parser.add_argument(
        "--out",
        type=json_out_argument(default),
        default=default,
        help=f"a .json file, or a folder to write {default.name} into (default: {default})",
    )


def json_out_argument(default: Path):
    """An argparse `type` for `--out`: a path to a .json file, or a folder to write
    `default.name` into (an existing folder, or one written with a trailing slash)."""

    def to_file(text: str) -> Path:
        path = Path(text)
        if path.is_dir() or text.endswith("/"):
            return path / default.name
        if path.suffix != ".json":
            raise argparse.ArgumentTypeError(
                f"{text}: expected a .json file or a folder (an existing one, or a new one "
                "written with a trailing /); the table and the plot are written beside the "
                "JSON, with its name"
            )
        return path

    return to_file
