"""Command-line interface: ``python -m rapm <stage> ...`` (also installed as ``rapm``).

Every stage takes ``--config FILE`` (repeatable; later files win) and ``--set KEY=VALUE``
(dotted key, YAML value). The merged config is validated against the schema before any
work starts. Heavy libraries are imported inside the stage functions, so ``rapm --help``
and config validation stay fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from rapm import __version__
from rapm.config import ConfigError, load_config, require
from rapm.errors import RapmError
from rapm.progress import redirect_output, to_terminal

log = logging.getLogger("rapm")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="config YAML (repeatable; later files override earlier ones)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one key, e.g. --set prompts.seed=3 (repeatable)",
    )


def stage_config(args: argparse.Namespace, *keys: str) -> dict:
    """Load and validate the stage's config; the (dotted) keys it needs must be present."""
    cfg = load_config(args.config, args.overrides, partial=True)
    require(cfg, *keys, source=", ".join(args.config))
    return cfg


# --- stages -----------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.files, args.overrides, partial=args.partial)
    sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False))
    return 0


def _cmd_fetch_coco(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data.coco")
    from rapm.coco import fetch_captions

    fetch_captions(cfg["data"]["coco"], out_dir=args.out_dir, cache_dir=args.cache_dir)
    return 0


def _cmd_toy_captions(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data.toy")
    from rapm.toy.captions import write_captions

    write_captions(cfg["data"]["toy"], out_dir=args.out_dir)
    return 0


def _cmd_toy_train_clip(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data.toy", "toy_clip")
    from rapm.toy.clip import train_toy_clip

    train_toy_clip(cfg["toy_clip"], cfg["data"]["toy"], out_dir=args.out_dir, threads=args.threads)
    return 0


def _cmd_toy_train_teacher(args: argparse.Namespace) -> int:
    from rapm.toy.train_teacher import train_teacher

    cfg = stage_config(args, "data.toy", "toy_teacher")
    train_teacher(
        cfg, out_dir=args.out_dir, state_dir=args.state_dir, command=" ".join(["python -m rapm"] + sys.argv[1:])
    )
    return 0


def _cmd_toy_eval_teacher(args: argparse.Namespace) -> int:
    from rapm.toy.eval_teacher import eval_teacher

    cfg = stage_config(args, "data.toy", "toy_teacher")
    eval_teacher(cfg, teacher=args.teacher, out_dir=args.out_dir)
    return 0


def _cmd_prompts(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "prompts")
    from rapm.prompts import make_prompt_sets

    make_prompt_sets(cfg["prompts"], captions_dir=args.captions_dir, out_dir=args.out_dir)
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from rapm.docs import sync_table

    ok = sync_table(args.file, write=args.write)
    if not ok:
        print(
            f"{args.file}: the configuration table is out of date; run `python -m rapm docs --write`", file=sys.stderr
        )
    return 0 if ok else 1


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _cmd_trajectories_init(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "teacher", "trajectories")
    _set_threads(args.threads)
    from pathlib import Path

    from rapm.io import write_json
    from rapm.trajectories import init_store

    info = init_store(
        args.dir, cfg["teacher"], cfg["trajectories"], args.prompts, args.manifest, key=Path(args.dir).name
    )
    write_json(args.out, info)
    return 0


def _cmd_trajectories_compute(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "teacher", "trajectories")
    _set_threads(args.threads)
    from rapm.io import write_summary
    from rapm.trajectories import compute_shard

    summary = compute_shard(
        args.dir, cfg["teacher"], cfg["trajectories"], args.shard, max_trajectories=args.max_trajectories
    )
    if summary["remaining"]:
        print(
            f"rapm: shard {args.shard} stopped with {summary['remaining']} trajectories left; run the same "
            "command again to resume (no summary written)",
            file=sys.stderr,
        )
        return 75
    write_summary(args.summary, "trajectories-shard", summary)
    return 0


def _cmd_trajectories_gather(args: argparse.Namespace) -> int:
    stage_config(args, "teacher", "trajectories")
    from rapm.trajectories import gather

    gather(args.dir, args.summaries, args.out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "teacher", "trajectories", "train")
    from rapm.train import train

    subset = None
    if args.subset_file is not None:
        import json
        from pathlib import Path

        groups = json.loads(Path(args.subset_file).read_text())["groups"]
        if args.group is None or not 0 <= args.group < len(groups):
            raise ConfigError(f"--group must be in [0, {len(groups)}) with --subset-file {args.subset_file}")
        subset = groups[args.group]
    summary = train(
        cfg,
        args.trajectories,
        args.out_dir,
        args.state_dir,
        max_iterations=args.max_iterations,
        subset=subset,
        name=args.name,
        prompts=args.prompts,
        threads=args.threads,
    )
    if summary is None:
        print(
            "rapm: training stopped before train.iterations; run the same command again to resume (no outputs written)",
            file=sys.stderr,
        )
        return 75
    return 0


def _read_row(path: str):
    from rapm.rows import Row

    return Row.from_file(path)


def _cmd_sample(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "teacher", "sampling")
    row = _read_row(args.row)
    _set_threads(args.threads)
    from rapm.sample import sample_shard

    sample_shard(
        row,
        cfg["teacher"],
        cfg["sampling"],
        args.prompts,
        args.shard,
        args.out_dir,
        args.manifest,
        resolution=row.get("resolution"),
    )
    return 0


def _cmd_reference_stats(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data", "sampling.num_images", "evaluation.fid", "evaluation.reference")
    _set_threads(args.threads)
    from rapm.evaluate import compute_reference_stats

    compute_reference_stats(cfg, args.prompts, args.out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data", "sampling", "evaluation")
    _set_threads(args.threads)
    from rapm.evaluate import evaluate_row

    row = _read_row(args.row)
    evaluate_row(
        cfg,
        row,
        args.manifests,
        args.reference,
        args.prompts,
        args.out,
        teacher_manifests=args.teacher_manifests or None,
    )
    return 0


def _cmd_tables(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "profile", "evaluation")
    from rapm.tables import write_tables

    write_tables(
        cfg,
        metrics=args.metrics,
        train_summaries=args.train_summaries,
        trajectory_manifests=args.trajectory_manifests,
        out_dir=args.out_dir,
        readme=args.readme,
    )
    return 0


def _cmd_msd_partition(args: argparse.Namespace) -> int:
    stage_config(args, "teacher", "trajectories")
    from rapm.msd import partition_store

    partition_store(args.trajectories, args.students, args.partition, args.seed, args.out_dir)
    return 0


def _cmd_curve(args: argparse.Namespace) -> int:
    cfg = stage_config(args, "data", "teacher", "sampling", "evaluation.fid", "evaluation.reference", "curves")
    _set_threads(args.threads)
    from rapm.curves import read_snapshots, snapshot_curve

    snapshot_curve(
        cfg,
        _read_row(args.row),
        read_snapshots(args.snapshots),
        args.prompts,
        int(cfg["curves"]["images"]),
        args.out_json,
        args.out_png,
    )
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rapm.images import comparison_grid
    from rapm.manifests import read_row_images

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


def _cmd_export_kohya(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rapm.errors import RapmError
    from rapm.kohya import export_kohya

    if not Path(args.lora).is_file():
        raise RapmError(f"{args.lora}: LoRA file not found")
    try:
        n = export_kohya(args.lora, args.out)
    except Exception as err:  # not a safetensors file, or not a rapm LoRA (names the key)
        raise RapmError(f"{args.lora}: not a LoRA written by `rapm train`: {err}") from err
    print(f"{args.out}: {n} LoRA modules in kohya-ss form")
    return 0


def _cmd_loss_curves(args: argparse.Namespace) -> int:
    from rapm.losscurves import plot_loss_curves

    last = plot_loss_curves(args.losses, args.out, window=args.window)
    for name, terms in last.items():
        print(f"{name}: " + ", ".join(f"{t} {v:.3f}" for t, v in terms.items()))
    return 0


def _cmd_verify(args) -> int:
    from rapm.verify import verify_results

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


def build_parser() -> argparse.ArgumentParser:
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

    def add(name: str, func, help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    p = add("validate-config", _cmd_validate, "validate config file(s) and print the resolved config")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    p.add_argument("--partial", action="store_true", help="accept a config with only some sections")

    p = add(
        "verify",
        _cmd_verify,
        "check every cached output under results/ (trajectory stores, sample shards, "
        "LoRAs, metrics); --repair deletes each damaged job's output so `snakemake all` reruns it",
    )
    p.add_argument("--results", default="results", help="the results folder")
    p.add_argument("--full", action="store_true", help="also read every trajectory chunk (CRC32C, finiteness)")
    p.add_argument("--repair", action="store_true", help="delete the outputs of each damaged job")

    p = add("docs", _cmd_docs, "regenerate (--write) or check (--check) docs/configuration.md's configuration table")
    p.add_argument("--file", default="docs/configuration.md", help="the Markdown file holding the table's markers")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")

    p = add(
        "fetch-coco", _cmd_fetch_coco, "download (or copy from data.coco.local_path) and verify the COCO 2014 captions"
    )
    _add_config_args(p)
    p.add_argument("--out-dir", required=True, help="where captions_{train,val}2014.json are written")
    p.add_argument(
        "--cache-dir", required=True, help="where the archive is downloaded (kept across runs so a download resumes)"
    )

    p = add("prompts", _cmd_prompts, "select training and evaluation prompt sets from a captions directory")
    _add_config_args(p)
    p.add_argument("--captions-dir", required=True, help="directory with captions_{train,val}2014.json")
    p.add_argument("--out-dir", required=True, help="where train.csv, eval.csv and manifest.json go")

    toy = add("toy", None, "the embedded toy dataset and models").add_subparsers(
        dest="toy_command", required=True, metavar="<toy-stage>"
    )
    p = add(
        "captions",
        _cmd_toy_captions,
        "render-free toy captions in the COCO captions schema (captions_{train,val}2014.json)",
        parent=toy,
    )
    _add_config_args(p)
    p.add_argument("--out-dir", required=True)
    p = add(
        "train-teacher",
        _cmd_toy_train_teacher,
        "train TinySD, the toy teacher (a StableDiffusionPipeline directory); run again to resume",
        parent=toy,
    )
    _add_config_args(p)
    p.add_argument("--out-dir", required=True, help="the pipeline directory to write (e.g. rapm/assets/tinysd)")
    p.add_argument(
        "--state-dir",
        default=None,
        help="resumable training state (default: <out-dir>.state); keep it outside declared outputs",
    )
    p = add(
        "eval-teacher",
        _cmd_toy_eval_teacher,
        "sample held-out toy val prompts with a teacher and score them with the attribute reader",
        parent=toy,
    )
    _add_config_args(p)
    p.add_argument("--teacher", required=True, help="StableDiffusionPipeline directory (e.g. rapm/assets/tinysd)")
    p.add_argument("--out-dir", required=True, help="where metrics.json and samples.png go")
    p = add(
        "train-clip",
        _cmd_toy_train_clip,
        "train the toy evaluator CLIP (open_clip custom config + safetensors); rerun to resume",
        parent=toy,
    )
    _add_config_args(p)
    p.add_argument(
        "--out-dir", required=True, help="where rapm-toyclip.{json,safetensors}, train_log.jsonl, summary.json go"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")

    traj = add(
        "trajectories", None, "teacher trajectories (method.md §1): init the store, compute shards, gather"
    ).add_subparsers(dest="trajectories_command", required=True, metavar="<step>")
    p = add(
        "init",
        _cmd_trajectories_init,
        "create the pre-allocated trajectory store (or keep a matching one, so shards resume)",
        parent=traj,
    )
    _add_config_args(p)
    p.add_argument(
        "--dir", required=True, help="trajectory directory results/trajectories/<key> (store.zarr goes inside)"
    )
    p.add_argument("--prompts", required=True, help="train.csv of the data stage")
    p.add_argument(
        "--manifest", required=True, help="manifest.json of the data stage (train.csv is checked against it)"
    )
    p.add_argument("--out", required=True, help="init.json: what was done (created, kept or reset)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p = add(
        "compute",
        _cmd_trajectories_compute,
        "compute the missing trajectories of one shard; run again to resume",
        parent=traj,
    )
    _add_config_args(p)
    p.add_argument("--dir", required=True, help="trajectory directory made by `init`")
    p.add_argument("--shard", type=int, required=True, help="shard index in [0, trajectories.shards)")
    p.add_argument("--summary", required=True, help="the shard's summary JSON, written once the shard is complete")
    p.add_argument(
        "--max-trajectories",
        type=int,
        default=None,
        help="stop after this many trajectories (exit code 75, no summary; rerun to resume)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p = add(
        "gather",
        _cmd_trajectories_gather,
        "verify every trajectory and chunk, consolidate the store, write its manifest",
        parent=traj,
    )
    _add_config_args(p)
    p.add_argument("--dir", required=True, help="trajectory directory")
    p.add_argument(
        "--summaries", nargs="*", default=[], help="the shards' summary JSON files (recorded in the manifest)"
    )
    p.add_argument("--out", required=True, help="manifest.json to write")

    p = add("train", _cmd_train, "train the RAPM student LoRA on a gathered trajectory store; run again to resume")
    _add_config_args(p)
    p.add_argument("--trajectories", required=True, help="trajectory directory results/trajectories/<key> (gathered)")
    p.add_argument(
        "--out-dir", required=True, help="where lora.safetensors, summary.json, losses.jsonl, validation.png go"
    )
    p.add_argument(
        "--state-dir",
        required=True,
        help="checkpoints, loss log, validation grids, snapshots; keep it outside declared outputs",
    )
    p.add_argument(
        "--max-iterations",
        type=int,
        default=None,
        help="stop after this many iterations of this run (exit code 75, no outputs; rerun to resume)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; given, it wins over train.num_threads (the workflow passes the rule's threads)",
    )
    p.add_argument("--subset-file", default=None, help="groups.json of `rapm msd-partition` (train one MSD student)")
    p.add_argument("--group", type=int, default=None, help="the student's group in --subset-file")
    p.add_argument("--name", default=None, help="the run's name in summary.json (default: the out-dir's name)")
    p.add_argument(
        "--prompts",
        default=None,
        help="train.csv of the data stage: the store must have been computed from it (hash and, with "
        "trajectories.num_trajectories null, row count checked)",
    )

    p = add(
        "msd-partition",
        _cmd_msd_partition,
        "MSD: split the training trajectories into K groups by the pooled text embedding; save the router",
    )
    _add_config_args(p)
    p.add_argument("--trajectories", required=True, help="trajectory directory results/trajectories/<key> (gathered)")
    p.add_argument("--students", type=int, required=True, help="K")
    p.add_argument("--partition", default="pca", choices=["pca", "kmeans"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True, help="where router.safetensors and groups.json go")

    p = add("sample", _cmd_sample, "sample one shard of a table row's evaluation images; run again to resume")
    _add_config_args(p)
    p.add_argument("--row", required=True, help="the row's file (results/config/rows/<row>.yaml)")
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--shard", type=int, required=True, help="shard index in [0, sampling.shards)")
    p.add_argument("--out-dir", required=True, help="the shard's folder (images/ and settings.json go inside)")
    p.add_argument("--manifest", required=True, help="the shard's manifest CSV, written once its images are complete")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")

    p = add("reference-stats", _cmd_reference_stats, "FID reference statistics of the evaluation prompts (cached .npz)")
    _add_config_args(p)
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")

    p = add("evaluate", _cmd_evaluate, "FID, CLIP score (and toy prompt-following accuracy) of one row's images")
    _add_config_args(p)
    p.add_argument("--row", required=True, help="the row's config file (results/config/rows/<row>.yaml)")
    p.add_argument("--manifests", nargs="+", required=True, help="the row's shard manifests")
    p.add_argument(
        "--teacher-manifests",
        nargs="*",
        default=[],
        help="the teacher row's shard manifests (same noise): distance to the teacher's images",
    )
    p.add_argument("--reference", required=True, help="reference statistics (.npz) of the protocol")
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")

    p = add("tables", _cmd_tables, "the paper's tables (Markdown, CSV, LaTeX) from measured metrics and published rows")
    _add_config_args(p)
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSON of every row")
    p.add_argument("--train-summaries", nargs="*", default=[], help="summary.json of every trained variant")
    p.add_argument("--trajectory-manifests", nargs="*", default=[], help="manifest.json of every trajectory store")
    p.add_argument("--out-dir", required=True, help="where main/ablations/resources .md/.csv/.tex go")
    p.add_argument("--readme", default=None, help="also write the results section into this README")

    p = add("curve", _cmd_curve, "FID (and toy accuracy) of a variant's LoRA snapshots against training iteration")
    _add_config_args(p)
    p.add_argument("--row", required=True, help="the variant's row file (results/config/rows/<variant>.yaml)")
    p.add_argument("--snapshots", required=True, help="snapshots.json written by `rapm train`")
    p.add_argument("--prompts", required=True, help="eval.csv of the data stage")
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-png", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")

    p = add(
        "export-kohya",
        _cmd_export_kohya,
        "write a trained LoRA in the kohya-ss form (sd-scripts, AUTOMATIC1111, ComfyUI) beside diffusers' one",
    )
    p.add_argument("lora", help="lora.safetensors written by `rapm train`")
    p.add_argument("out", help="the kohya-ss file to write, e.g. results/train/rapm/lora_kohya.safetensors")

    p = add("loss-curves", _cmd_loss_curves, "loss terms against iteration of trained runs (one PNG)")
    p.add_argument("--losses", nargs="+", required=True, help="losses.jsonl files written by `rapm train`")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--window", type=int, default=25, help="iterations in each running mean")

    p = add("grid", _cmd_grid, "image grid: the same prompts and seeds across table rows (one line per row)")
    p.add_argument("--manifests", nargs="+", required=True, help="shard manifests results/samples/<row>/shard-*.csv")
    p.add_argument("--num", type=int, default=8, help="prompts (columns)")
    p.add_argument("--out", required=True, help="the PNG to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
