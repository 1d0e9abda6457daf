"""``python -m rapm verify``: find damaged cached outputs and make the workflow see them.

Snakemake decides what to rerun from file existence and times, so a deleted PNG, a truncated LoRA or a
damaged trajectory chunk is invisible to it: ``snakemake -n all`` says there is nothing to do. This
command checks every cached artefact under ``results/`` and, with ``--repair``, deletes the one output
file that stands for the damaged job (a sample shard's manifest, the LoRA, a store's shard summaries
and manifest, a metrics file), so a plain ``snakemake all`` reruns exactly those jobs (and what depends
on them); the stages resume, so only the damaged part is recomputed. Snakemake rebuilds a missing
intermediate file only when a target needs it, so a damaged sample shard also loses its row's
metrics; a damaged trajectory store is rebuilt by ``snakemake results/trajectories/<key>/manifest.json``
(its LoRAs stay valid: they were trained on the intact store).

Checked: each trajectory store (every done flag, every chunk file present with its size; ``--full``
also reads every chunk, checking its CRC32C and finiteness), each sample shard (every listed PNG
present and decodable), each trained LoRA (its sha256 equals the one its ``summary.json`` recorded),
each metrics JSON (parses). Exit status 1 when something is damaged.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rapm.io import sha256_file

log = logging.getLogger(__name__)


@dataclass
class Damage:
    artefact: str  # what is damaged
    problem: str  # what is wrong with it
    remove: list[Path]  # the outputs whose removal makes Snakemake rerun the job that repairs it


def _stores(results: Path, full: bool) -> list[Damage]:
    from rapm.store import TrajectoryStoreError, verify_store

    out = []
    for manifest in sorted(results.glob("trajectories/*/manifest.json")):
        directory = manifest.parent
        try:
            verify_store(directory, full=full)
        except TrajectoryStoreError as err:
            out.append(
                Damage(
                    str(directory),
                    str(err).splitlines()[-1].strip(" -"),
                    [manifest, *sorted(directory.glob("shards/*.json"))],
                )
            )
    return out


def _samples(results: Path) -> list[Damage]:
    from PIL import Image

    out = []
    for shard in sorted(results.glob("samples/*/shard-*-of-*.csv")):
        try:
            files = list(pd.read_csv(shard)["file"])
        except Exception as err:  # noqa: BLE001 - any unreadable manifest is damage
            out.append(Damage(str(shard), f"unreadable manifest ({err})", [shard]))
            continue
        bad = []
        for name in files:
            path = shard.parent / name
            try:
                with Image.open(path) as image:
                    image.load()
            except Exception:  # noqa: BLE001 - missing, truncated or not an image
                bad.append(str(name))
        if (
            bad
        ):  # Snakemake regenerates a missing intermediate only when a target needs it: remove the row's metrics too
            out.append(
                Damage(
                    str(shard),
                    f"{len(bad)} of {len(files)} images missing or unreadable (first: {bad[0]})",
                    [shard, results / "eval" / shard.parent.name / "metrics.json"],
                )
            )
    return out


def _loras(results: Path) -> list[Damage]:
    out = []
    for summary in sorted(results.glob("train/**/summary.json")):
        lora = summary.parent / "lora.safetensors"
        try:
            expected = json.loads(summary.read_text())["sha256"]["lora.safetensors"]
        except Exception as err:  # noqa: BLE001
            out.append(Damage(str(summary), f"unreadable training summary ({err})", [summary]))
            continue
        if lora.is_file() and sha256_file(lora) != expected:  # a missing LoRA is a missing output: Snakemake sees it
            out.append(Damage(str(lora), "its sha256 differs from the one summary.json recorded", [lora]))
    return out


def _metrics(results: Path) -> list[Damage]:
    out = []
    for path in sorted(results.glob("eval/*/metrics.json")):
        try:
            json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001
            out.append(Damage(str(path), f"not valid JSON ({err})", [path]))
    return out


def verify_results(results: str | Path = "results", *, full: bool = False, repair: bool = False) -> list[Damage]:
    """Every damaged artefact under ``results`` (see the module doc); ``repair`` deletes each one's outputs."""
    results = Path(results)
    damage = [*_stores(results, full), *_samples(results), *_loras(results), *_metrics(results)]
    for d in damage:
        log.warning("damaged: %s: %s", d.artefact, d.problem)
        if repair:
            for path in d.remove:
                path.unlink(missing_ok=True)
                log.warning("removed %s (the job that repairs it reruns with `snakemake all`)", path)
    return damage


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm verify`` (registered in :mod:`rapm.cli`)."""
    p.add_argument("--results", default="results", help="the results folder")
    p.add_argument("--full", action="store_true", help="also read every trajectory chunk (CRC32C, finiteness)")
    p.add_argument("--repair", action="store_true", help="delete the outputs of each damaged job")


def command(args: argparse.Namespace) -> int:

    damage = verify_results(args.results, full=args.full, repair=args.repair)
    for d in damage:
        print(f"damaged: {d.artefact}: {d.problem}")
    if not damage:
        print(f"{args.results}: every cached output checked, none damaged")
    elif not args.repair:
        print("run `python -m rapm verify --repair`, then `snakemake all`, to recompute them")
    else:
        print("removed their outputs; `snakemake all` recomputes them")
    return 1 if damage else 0
