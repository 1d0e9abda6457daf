"""Per-rule time table of a workflow run, from Snakemake's ``benchmark:`` files (``logs/benchmarks/**/*.tsv``).

    python benchmarks/rule_times.py [--root .]

Each rule writes one TSV per job under ``logs/benchmarks/<stage>/...`` (mirroring ``results/``); the first
path component after ``logs/benchmarks/`` names the stage. Prints, per stage folder: jobs, summed wall
seconds (``s`` column), the longest job, and the share of the summed time. The sum over jobs is CPU
occupancy, not the run's wall time when jobs run side by side (``snakemake all`` runs two at once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def rule_times(root: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted((root / "logs" / "benchmarks").rglob("*.tsv")):
        parts = tsv.relative_to(root / "logs" / "benchmarks").parts
        seconds = float(pd.read_csv(tsv, sep="\t")["s"].iloc[0])
        rows.append({"stage": parts[0], "job": "/".join(parts[1:]), "s": seconds})
    if not rows:
        raise SystemExit(f"no benchmark TSVs under {root / 'logs' / 'benchmarks'}: run the workflow first")
    df = pd.DataFrame(rows)
    table = df.groupby("stage").agg(jobs=("s", "size"), seconds=("s", "sum"), longest=("s", "max"))
    table["share"] = table["seconds"] / table["seconds"].sum()
    return table.sort_values("seconds", ascending=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--root", default=".", help="the workflow's working directory")
    args = p.parse_args(argv)
    table = rule_times(Path(args.root))
    print("| stage | jobs | summed s | longest s | share |\n|---|---|---|---|---|")
    for stage, r in table.iterrows():
        print(f"| {stage} | {int(r['jobs'])} | {r['seconds']:.1f} | {r['longest']:.1f} | {r['share']:.0%} |")
    print(f"| total | {int(table['jobs'].sum())} | {table['seconds'].sum():.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
