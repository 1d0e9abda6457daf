"""Multi-student distillation (MSD, Song et al., arXiv 2410.23274; method.md §7): partition and router.

The conditioning space is split into K disjoint, balanced groups; one RAPM student is trained per
group on its group's trajectories, and at inference a router sends each prompt to its student (the
cost stays that of one student). Groups come from the teacher's text embedding pooled over tokens
(SDXL: its pooled embedding):

- ``pca`` (DEFAULT, K a power of two): centre the training prompts' features, project them on the first
  log2 K principal components, and take the sign of each projection around its median; the bits give
  the group (K = 4: the four quadrants of PC1 × PC2). Each bit splits the training prompts in half.
- ``kmeans``: K-means (k-means++ initialisation, seeded) in the same centred space; any K.

:class:`Router` holds the fitted centre, components, medians (or centroids); it is saved with the
students as safetensors (arrays) plus JSON metadata, and assigns any prompt's features to a group.
Sampling an MSD row routes each prompt (:func:`route`) and swaps the students' LoRAs into one
teacher pipeline in turn (:func:`each_student`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rapm.cliargs import add_config_args, stage_config
from rapm.errors import RapmError
from rapm.rows import Row

PARTITIONS = ("pca", "kmeans")


class RouterError(RapmError):
    """A partition cannot be made or a router file is unusable."""


def pooled_features(prompt_embeds: torch.Tensor | np.ndarray, pooled_embeds=None) -> np.ndarray:
    """(J, D) features of a batch of conditionings: SDXL's pooled embedding, else the mean over tokens."""
    if pooled_embeds is not None:
        return np.asarray(torch.as_tensor(pooled_embeds).float(), dtype=np.float64)
    return np.asarray(torch.as_tensor(prompt_embeds).float().mean(dim=1), dtype=np.float64)


@dataclass
class Router:
    """The fitted partition: ``center`` (D,), and ``components`` (B, D) + ``medians`` (B,) for ``pca`` or
    ``centroids`` (K, D) for ``kmeans``."""

    method: str
    num_groups: int
    center: np.ndarray
    components: np.ndarray | None = None
    medians: np.ndarray | None = None
    centroids: np.ndarray | None = None

    @classmethod
    def fit(cls, features: np.ndarray, num_groups: int, method: str = "pca", seed: int = 0) -> Router:
        x = np.asarray(features, dtype=np.float64)
        if method not in PARTITIONS:
            raise RouterError(f"unknown MSD partition {method!r}; choose {', '.join(PARTITIONS)}")
        if num_groups < 1 or len(x) < num_groups:
            raise RouterError(f"cannot split {len(x)} prompts into {num_groups} groups")
        center = x.mean(axis=0)
        xc = x - center
        if method == "pca":
            bits = int(round(math.log2(num_groups)))
            if 2**bits != num_groups:
                raise RouterError(
                    f"the pca partition needs a power-of-two number of students, got {num_groups}; "
                    "use partition: kmeans for other K"
                )
            if bits == 0:
                return cls(method, 1, center, np.zeros((0, x.shape[1])), np.zeros(0))
            _, _, vt = np.linalg.svd(xc, full_matrices=False)
            comps = vt[:bits]
            comps = comps * np.sign(comps[:, :1] + (comps[:, :1] == 0))  # a fixed orientation per component
            medians = np.median(xc @ comps.T, axis=0)
            return cls(method, num_groups, center, comps, medians)
        rng = np.random.default_rng(seed)
        cents = [xc[rng.integers(len(xc))]]
        for _ in range(1, num_groups):  # k-means++
            d2 = np.min(((xc[:, None, :] - np.array(cents)[None]) ** 2).sum(-1), axis=1)
            cents.append(xc[rng.choice(len(xc), p=d2 / d2.sum())] if d2.sum() > 0 else xc[rng.integers(len(xc))])
        cents = np.array(cents)
        for _ in range(100):
            labels = np.argmin(((xc[:, None, :] - cents[None]) ** 2).sum(-1), axis=1)
            new = np.array([xc[labels == k].mean(0) if (labels == k).any() else cents[k] for k in range(num_groups)])
            if np.allclose(new, cents):
                break
            cents = new
        return cls(method, num_groups, center, centroids=cents)

    def assign(self, features: np.ndarray) -> np.ndarray:
        """Group index in [0, K) of each row of ``features`` (J, D)."""
        xc = np.asarray(features, dtype=np.float64) - self.center
        if self.method == "pca":
            if self.num_groups == 1:
                return np.zeros(len(xc), dtype=np.int64)
            bits = (xc @ self.components.T > self.medians).astype(np.int64)
            return (bits * (2 ** np.arange(bits.shape[1]))).sum(axis=1)
        return np.argmin(((xc[:, None, :] - self.centroids[None]) ** 2).sum(-1), axis=1).astype(np.int64)

    def save(self, path: str | Path) -> None:
        """Write the router as safetensors (numpy arrays; deterministic bytes, :func:`rapm.io.save_safetensors`)."""
        from rapm.io import save_safetensors

        arrays = {
            k: np.ascontiguousarray(getattr(self, k))
            for k in ("center", "components", "medians", "centroids")
            if getattr(self, k) is not None
        }
        meta = {"rapm.router": json.dumps({"method": self.method, "num_groups": self.num_groups})}
        save_safetensors(arrays, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> Router:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = json.loads(f.metadata()["rapm.router"])
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise RouterError(f"{path}: not a rapm router file ({err})") from err
        return cls(meta["method"], int(meta["num_groups"]), **arrays)


def group_sizes(groups: Sequence[int], num_groups: int) -> list[int]:
    return np.bincount(np.asarray(groups, dtype=np.int64), minlength=num_groups).tolist()


def partition_store(trajectories: str | Path, num_groups: int, method: str, seed: int, out_dir: str | Path) -> dict:
    """Fit the router on a trajectory store's conditioning; write ``router.safetensors`` and ``groups.json``."""
    from rapm.io import write_json
    from rapm.store import TrajectoryDataset

    ds = TrajectoryDataset(trajectories)
    items = [ds[j] for j in range(len(ds))]
    feats = pooled_features(
        torch.stack([it["prompt_embeds"] for it in items]),
        torch.stack([it["pooled_embeds"] for it in items]) if "pooled_embeds" in items[0] else None,
    )
    router = Router.fit(feats, num_groups, method, seed)
    groups = router.assign(feats)
    out_dir = Path(out_dir)
    router.save(out_dir / "router.safetensors")
    info = {
        "method": method,
        "num_groups": num_groups,
        "sizes": group_sizes(groups, num_groups),
        "groups": [[int(j) for j in np.flatnonzero(groups == k)] for k in range(num_groups)],
    }
    if min(info["sizes"]) == 0:
        raise RouterError(f"MSD partition of {trajectories} left a group empty (sizes {info['sizes']})")
    write_json(out_dir / "groups.json", info)
    return info


# --- sampling an MSD row -------------------------------------------------------------------------


@torch.no_grad()
def route(row: Row, teacher, captions: list[str]) -> list[int]:
    """The MSD student of each caption: the row's router on the (LoRA-free) teacher's pooled text embedding."""
    from rapm.conditioning import encode_prompts

    router = Router.load(row.router)
    groups = []
    for start in range(0, len(captions), 64):
        cond = encode_prompts(teacher, captions[start : start + 64])
        groups += router.assign(
            pooled_features(cond.prompt_embeds.cpu(), None if cond.pooled_embeds is None else cond.pooled_embeds.cpu())
        ).tolist()
    return groups


def each_student(teacher, row: Row, groups: list[int], todo: list[int], start: int):
    """Yield ``(student row, its images in todo)`` for each student with images to make, with that
    student's LoRA fused into ``teacher``; between students the base weights are restored bit for bit
    (:func:`rapm.pipeline.restore_base`). ``groups[i - start]`` is image i's student."""
    from rapm.pipeline import base_weights, fuse_row_lora, restore_base

    plan = [(row.with_lora(lora), [i for i in todo if groups[i - start] == k]) for k, lora in enumerate(row.loras)]
    plan = [(sub_row, indices) for sub_row, indices in plan if indices]
    base = base_weights(teacher) if plan else None
    for n, (sub_row, indices) in enumerate(plan):
        if n:
            restore_base(teacher, base)
        fuse_row_lora(teacher, sub_row)
        yield sub_row, indices


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm msd-partition`` (registered in :mod:`rapm.cli`)."""
    add_config_args(p)
    p.add_argument("--trajectories", required=True, help="trajectory directory results/trajectories/<key> (gathered)")
    p.add_argument("--students", type=int, required=True, help="K")
    p.add_argument("--partition", default="pca", choices=["pca", "kmeans"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True, help="where router.safetensors and groups.json go")


def command(args: argparse.Namespace) -> int:
    stage_config(args, "teacher", "trajectories")

    partition_store(args.trajectories, args.students, args.partition, args.seed, args.out_dir)
    return 0
