"""Command-line interface: ``python -m rapm <stage> ...`` (also installed as ``rapm``).

Every stage takes ``--config FILE`` (repeatable; later files win) and ``--set KEY=VALUE``
(dotted key, YAML value). The merged config is validated against the schema before any
work starts.

This module is only the registry: each stage module owns its command, as ``<prefix>arguments(parser)``
(its options) and ``<prefix>command(args)`` (what it runs, returning the exit code). Only the module
of the command given is imported, so ``rapm --help`` and ``rapm validate-config`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rapm import __version__
from rapm.config import ConfigError
from rapm.errors import RapmError
from rapm.progress import redirect_output, to_terminal

log = logging.getLogger("rapm")

#: command -> (module, prefix of its ``arguments`` / ``command`` functions, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "validate-config": ("rapm.config", "", "validate config file(s) and print the resolved config"),
    "verify": (
        "rapm.verify",
        "",
        "check every cached output under results/ (trajectory stores, sample shards, LoRAs, metrics); --repair deletes each damaged job's output so `snakemake all` reruns it",
    ),
    "docs": (
        "rapm.configdoc",
        "",
        "regenerate (--write) or check (--check) docs/configuration.md's configuration table",
    ),
    "fetch-coco": ("rapm.coco", "", "download (or copy from data.coco.local_path) and verify the COCO 2014 captions"),
    "prompts": ("rapm.prompts", "", "select training and evaluation prompt sets from a captions directory"),
    "toy captions": (
        "rapm.toy.captions",
        "",
        "render-free toy captions in the COCO captions schema (captions_{train,val}2014.json)",
    ),
    "toy train-teacher": (
        "rapm.toy.train_teacher",
        "",
        "train TinySD, the toy teacher (a StableDiffusionPipeline directory); run again to resume",
    ),
    "toy eval-teacher": (
        "rapm.toy.eval_teacher",
        "",
        "sample held-out toy val prompts with a teacher and score them with the attribute reader",
    ),
    "toy train-clip": (
        "rapm.toy.clip",
        "",
        "train the toy evaluator CLIP (open_clip custom config + safetensors); rerun to resume",
    ),
    "trajectories init": (
        "rapm.trajectories",
        "init_",
        "create the pre-allocated trajectory store (or keep a matching one, so shards resume)",
    ),
    "trajectories compute": (
        "rapm.trajectories",
        "compute_",
        "compute the missing trajectories of one shard; run again to resume",
    ),
    "trajectories gather": (
        "rapm.trajectories",
        "gather_",
        "verify every trajectory and chunk, consolidate the store, write its manifest",
    ),
    "train": ("rapm.train", "", "train the RAPM student LoRA on a gathered trajectory store; run again to resume"),
    "msd-partition": (
        "rapm.msd",
        "",
        "MSD: split the training trajectories into K groups by the pooled text embedding; save the router",
    ),
    "sample": ("rapm.sample", "", "sample one shard of a table row's evaluation images; run again to resume"),
    "reference-stats": (
        "rapm.evaluate",
        "reference_stats_",
        "FID reference statistics of the evaluation prompts (cached .npz)",
    ),
    "evaluate": ("rapm.evaluate", "", "FID, CLIP score (and toy prompt-following accuracy) of one row's images"),
    "tables": ("rapm.tables", "", "the paper's tables (Markdown, CSV, LaTeX) from measured metrics and published rows"),
    "curve": ("rapm.curves", "", "FID (and toy accuracy) of a variant's LoRA snapshots against training iteration"),
    "export-kohya": (
        "rapm.kohya",
        "",
        "write a trained LoRA in the kohya-ss form (sd-scripts, AUTOMATIC1111, ComfyUI) beside diffusers' one",
    ),
    "loss-curves": ("rapm.losscurves", "", "loss terms against iteration of trained runs (one PNG)"),
    "grid": ("rapm.grid", "", "image grid: the same prompts and seeds across table rows (one line per row)"),
}
#: commands with sub-commands ("toy captions", "trajectories init", ...) and their help
GROUPS = {
    "toy": "the embedded toy dataset and models",
    "trajectories": "teacher trajectories (method.md §1): init the store, compute shards, gather",
}


def requested(argv: list[str]) -> str | None:
    """The command ``argv`` names (``"train"``, ``"toy captions"``), skipping the global options; None if none."""
    words, i = [], 0
    while i < len(argv) and len(words) < 2:
        arg = argv[i]
        if arg == "--log":
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        words.append(arg)
        if arg not in GROUPS:
            break
        i += 1
    name = " ".join(words)
    return name if name in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed; ``command`` (or ``"*"`` for all) also gets its arguments,
    from its module (imported here)."""
    parser = argparse.ArgumentParser(
        prog="rapm", description=__doc__.split("\n\n")[0].replace("``", "`"), allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"rapm {__version__}")
    parser.add_argument(
        "--log",
        metavar="FILE",
        default=None,
        help="write everything (log records, warnings, library output) to FILE and keep the "
        "terminal for progress lines and errors (what the workflow's rules do)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    parents = {"": sub}
    for name, (module, prefix, help_) in COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group not in parents:
            parents[group] = sub.add_parser(
                group, help=GROUPS[group], description=GROUPS[group], allow_abbrev=False
            ).add_subparsers(dest=f"{group}_command", required=True, metavar=f"<{group}-stage>")
        p = parents[group].add_parser(leaf, help=help_, description=help_, allow_abbrev=False)
        if command in (name, "*"):
            stage = importlib.import_module(module)
            getattr(stage, f"{prefix}arguments")(p)
            p.set_defaults(func=getattr(stage, f"{prefix}command"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(requested(argv)).parse_args(argv)
    if args.log:
        redirect_output(args.log)
        logging.captureWarnings(True)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except RapmError as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"rapm: {kind}: {err}", file=sys.stderr)
        to_terminal(f"rapm {args.command}: {kind}: {err}" + (f" (log: {args.log})" if args.log else ""))
        return err.exit_code
    except BaseException as err:
        to_terminal(
            f"rapm {args.command}: failed with {type(err).__name__}" + (f"; see {args.log}" if args.log else "")
        )
        raise
