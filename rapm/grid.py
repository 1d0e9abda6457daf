"""The ``grid`` stage: the same prompts and seeds across table rows, one line per row
(:func:`rapm.images.comparison_grid` on the rows' sample manifests)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rapm.images import comparison_grid
from rapm.manifests import read_row_images

# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm grid`` (registered in :mod:`rapm.cli`)."""
    p.add_argument("--manifests", nargs="+", required=True, help="shard manifests results/samples/<row>/shard-*.csv")
    p.add_argument("--num", type=int, default=8, help="prompts (columns)")
    p.add_argument("--out", required=True, help="the PNG to write")


def command(args: argparse.Namespace) -> int:
    by_row: dict[str, list[str]] = {}
    for m in args.manifests:  # results/samples/<row>/shard-*.csv
        by_row.setdefault(Path(m).parent.name, []).append(m)
    rows, captions = {}, None
    for name, manifests in by_row.items():
        images, table = read_row_images(manifests)
        rows[name] = images[: args.num]
        captions = list(table["caption"][: args.num])
    comparison_grid(rows, captions, args.out)
    return 0
