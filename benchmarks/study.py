"""The ablation study in parts: which files to build, and tables from every part collected so far.

A full ``snakemake ablations`` (every variant x ``replicates.every`` seeds) does not fit one session on
the 2-core machine, and ``results/`` does not survive a session. So the study runs in parts: each part
builds some variants' replicates with Snakemake, then ``collect`` copies their metrics, training
summaries and trajectory manifests (small JSON files) under ``docs/results/ablations/`` and rebuilds
the tables there from everything collected so far, with ``rapm tables`` (the same code as the
workflow's ``tables`` rule, never typed by hand)::

    snakemake $(python benchmarks/study.py targets rapm absolute_only relative_only) --rerun-triggers mtime input params
    python benchmarks/study.py collect rapm absolute_only relative_only

Rows are ordered as the workflow orders them (the first variant of ``variants``, ``rapm``, is the
base of the "Δ vs rapm" columns), so collecting parts in any order gives the same tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rapm.config import load_config, select_keys  # noqa: E402
from rapm.plan import rows, stage_keys, trajectory_store_key, variant_config  # noqa: E402
from rapm.rows import TRAINED_KINDS  # noqa: E402
from rapm.tables import write_tables  # noqa: E402


def study_rows(cfg: dict, variants: list[str]) -> dict[str, dict]:
    """The rows of ``variants`` (every replicate) and the teacher / initialisation rows they are judged against."""
    every = rows(cfg, every=True)
    keep = {name for name, row in every.items() if row.get("variant") in variants}
    for name in list(keep):
        row = every[name]
        keep |= {ref for ref in ("teacher", f"teacher-{row['steps']}step", row.get("init")) if ref in every}
    return {name: row for name, row in every.items() if name in keep}  # the workflow's order


def targets(cfg: dict, variants: list[str]) -> list[str]:
    return [f"results/eval/{name}/metrics.json" for name in study_rows(cfg, variants)]


def collect(cfg: dict, variants: list[str], out: Path, results: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("metrics", "train", "trajectories"):
        (out / sub).mkdir(exist_ok=True)
    for name, row in study_rows(cfg, variants).items():
        shutil.copyfile(results / "eval" / name / "metrics.json", out / "metrics" / f"{name}.json")
        if row["kind"] in TRAINED_KINDS:
            if row["kind"] == "msd":
                for k in range(len(row["loras"])):
                    shutil.copyfile(
                        results / "train" / name / "students" / str(k) / "summary.json",
                        out / "train" / f"{name}-s{k}.json",
                    )
            else:
                shutil.copyfile(results / "train" / name / "summary.json", out / "train" / f"{name}.json")
            key = trajectory_store_key({**cfg, **variant_config(cfg, name)})
            shutil.copyfile(results / "trajectories" / key / "manifest.json", out / "trajectories" / f"{key}.json")
    tables_cfg = select_keys(cfg, stage_keys()["tables"])
    (out / "tables.json").write_text(json.dumps(tables_cfg, indent=1, sort_keys=True) + "\n")
    order = list(rows(cfg, every=True))
    metrics = sorted(
        (out / "metrics").glob("*.json"), key=lambda p: order.index(p.stem) if p.stem in order else len(order)
    )
    write_tables(
        tables_cfg,
        metrics=metrics,
        train_summaries=sorted((out / "train").glob("*.json")),
        trajectory_manifests=sorted((out / "trajectories").glob("*.json")),
        out_dir=out,
    )
    print(f"{out}: tables from {len(metrics)} rows")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["targets", "collect"])
    parser.add_argument("variants", nargs="+", help="variants of this part (each with replicates.every seeds)")
    parser.add_argument("--config", nargs="+", default=[str(ROOT / "config" / "config.yaml")])
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default="docs/results/ablations")
    args = parser.parse_args()
    cfg = load_config(args.config)
    unknown = [v for v in args.variants if v not in cfg["variants"]]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; defined: {sorted(cfg['variants'])}")
    if args.command == "targets":
        print(" ".join(targets(cfg, args.variants)))
    else:
        collect(cfg, args.variants, Path(args.out), Path(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
