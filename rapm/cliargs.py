"""What every stage's command line shares: ``--config`` / ``--set``, the validated stage config, threads.

Each stage module owns its command (``arguments(parser)`` and ``command(args)``, see :mod:`rapm.cli`);
these helpers keep the common options identical across them.
"""

from __future__ import annotations

import argparse
import sys

from rapm.config import load_config, require


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` (repeatable; later files win) and ``--set KEY=VALUE`` (dotted key, YAML value)."""
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


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads of the command (default: torch's); the command passes it to
    :func:`set_threads`. The workflow's rules pass their ``threads:``."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def stage_config(args: argparse.Namespace, *keys: str) -> dict:
    """Load and validate the stage's config; the (dotted) keys it needs must be present."""
    cfg = load_config(args.config, args.overrides, partial=True)
    require(cfg, *keys, source=", ".join(args.config))
    return cfg


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when ``--threads`` was given (torch is imported only then)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


RESUMABLE_EXIT = 75  # EX_TEMPFAIL: a stage stopped on request (--max-…) and resumes when run again


def stopped(what: str, unwritten: str) -> int:
    """Say on stderr that ``what`` stopped early and how to resume; the exit code of such a stop."""
    print(f"rapm: {what}; run the same command again to resume (no {unwritten} written)", file=sys.stderr)
    return RESUMABLE_EXIT
