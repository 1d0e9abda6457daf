"""Per-rule time table of a workflow run, from Snakemake's ``benchmark:`` files (``logs/benchmarks/**/*.tsv``).

    python benchmarks/rule_times.py [--root .]
    python benchmarks/rule_times.py --timeline .snakemake/log/<run>.snakemake.log

Each rule writes one TSV per job under ``logs/benchmarks/<stage>/...`` (mirroring ``results/``); the first
path component after ``logs/benchmarks/`` names the stage. Prints, per stage folder: jobs, summed wall
seconds (``s`` column), the longest job, and the share of the summed time. The sum over jobs is CPU
occupancy, not the run's wall time when jobs run side by side (``snakemake all`` runs two at once).

``--timeline LOG`` reads Snakemake's own log of one run instead: each job's start and end (seconds from the
run's first job, to the second: Snakemake stamps whole seconds), sorted by start, then the run's span and
the seconds during which no job, one job or several jobs ran.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
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


_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_START = re.compile(r"^(?:local)?rule (\w+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_END = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def timeline(log_text: str) -> pd.DataFrame:
    """(job, rule, start, end, seconds) per finished job of one Snakemake log; start/end in seconds from the
    first job's start."""
    stamp, pending, starts, rows = None, None, {}, []
    for line in log_text.splitlines():
        if m := _STAMP.match(line.strip()):
            stamp = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif m := _START.match(line.strip()):
            pending = (m.group(1), stamp)
        elif (m := _JOBID.match(line)) and pending is not None:
            starts[int(m.group(1))], pending = pending, None
        elif (m := _END.match(line.strip())) and int(m.group(1)) in starts:
            rule, start = starts.pop(int(m.group(1)))
            rows.append({"job": int(m.group(1)), "rule": rule, "start": start, "end": stamp})
    if not rows:
        raise SystemExit("no finished jobs in this log (is it a .snakemake/log/*.snakemake.log file?)")
    df = pd.DataFrame(rows)
    t0 = df["start"].min()
    df["start"] = (df["start"] - t0).dt.total_seconds().astype(int)
    df["end"] = (df["end"] - t0).dt.total_seconds().astype(int)
    df["seconds"] = df["end"] - df["start"]
    return df.sort_values(["start", "job"]).reset_index(drop=True)


def occupancy(df: pd.DataFrame) -> dict[int, int]:
    """Seconds of the run's span during which k jobs ran, for each k."""
    counts = {}
    for t in range(int(df["end"].max())):
        k = int(((df["start"] <= t) & (df["end"] > t)).sum())
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--root", default=".", help="the workflow's working directory")
    p.add_argument("--timeline", default=None, help="a Snakemake log (.snakemake/log/*.snakemake.log) to read instead")
    args = p.parse_args(argv)
    if args.timeline:
        df = timeline(Path(args.timeline).read_text())
        print("| start s | end s | seconds | rule | job |\n|---|---|---|---|---|")
        for _, r in df[df["seconds"] > 0].iterrows():
            print(f"| {r['start']} | {r['end']} | {r['seconds']} | {r['rule']} | {r['job']} |")
        busy = ", ".join(f"{k} job(s) {s} s" for k, s in occupancy(df).items())
        print(
            f"\nspan {df['end'].max()} s ({len(df)} jobs, {(df['seconds'] == 0).sum()} under a second not listed): {busy}"
        )
        return 0
    table = rule_times(Path(args.root))
    print("| stage | jobs | summed s | longest s | share |\n|---|---|---|---|---|")
    for stage, r in table.iterrows():
        print(f"| {stage} | {int(r['jobs'])} | {r['seconds']:.1f} | {r['longest']:.1f} | {r['share']:.0%} |")
    print(f"| total | {int(table['jobs'].sum())} | {table['seconds'].sum():.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
