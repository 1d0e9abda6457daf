"""A table row: what one line of a table measures, typed (imports only rapm.config).

The workflow builds the rows (:func:`rapm.plan.rows`) and writes each to
``results/config/rows/<name>.yaml`` (:meth:`Row.to_dict`); sampling, curves and evaluation read it
back (:meth:`Row.from_file`). Kinds:

* ``teacher``: the teacher with its many-step sampler and guidance, or at a student's N steps with guidance;
* ``init``: the teacher at a student's N steps and guidance 1, the student's initialisation (LoRA B = 0);
* ``student``: a trained LoRA (``lora``), judged against ``init``; ``replicate`` r trained with train.seed + r;
* ``msd``: K students (``loras``) and the ``router`` that sends each prompt to one of them;
* ``external``: a diffusers-loadable LoRA of someone else, with its own steps and guidance.

A row also reads as a mapping of the keys :meth:`to_dict` writes (``row["steps"]``, ``{**row, ...}``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from rapm.config import ConfigError, read_yaml

KINDS = ("teacher", "init", "student", "msd", "external")
#: kinds whose weights this workflow trains (one per training seed: they have replicates)
TRAINED_KINDS = ("student", "msd")
_ALWAYS = ("name", "kind", "steps", "guidance", "lora", "resolution")  # written even when None


@dataclass(frozen=True)
class Row(Mapping):
    name: str
    kind: str
    steps: int
    guidance: float
    lora: str | None = None
    resolution: int | None = None
    variant: str | None = None
    replicate: int | None = None
    init: str | None = None
    router: str | None = None
    loras: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"row {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.kind == "msd" and not (self.router and self.loras):
            raise ConfigError(f"row {self.name!r}: an msd row needs router and loras")
        if self.loras is not None and not isinstance(self.loras, tuple):
            object.__setattr__(self, "loras", tuple(self.loras))

    @property
    def trained(self) -> bool:
        """Whether this workflow trains the row's weights."""
        return self.kind in TRAINED_KINDS

    def weight_files(self) -> list[str]:
        """The files the row's pixels depend on besides the teacher: its LoRA, or its students and router."""
        if self.lora:
            return [self.lora]
        return [*(self.loras or ()), *([self.router] if self.router else [])]

    def workflow_inputs(self) -> dict[str, Any]:
        """The row's weights that this workflow trains (Snakemake inputs: retraining resamples the row)."""
        if self.kind == "student":
            return {"lora": self.lora}
        if self.kind == "msd":
            return {"router": self.router, "loras": list(self.loras)}
        return {}

    def with_lora(self, lora: str | None) -> Row:
        """The same row carrying ``lora`` (an MSD student, a training snapshot)."""
        kind = "student" if self.kind == "msd" and lora else self.kind
        return replace(
            self,
            lora=lora,
            kind=kind,
            router=None if kind != "msd" else self.router,
            loras=None if kind != "msd" else self.loras,
        )

    # --- the file format ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.name in _ALWAYS:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "row") -> Row:
        if isinstance(data, Row):
            return data
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = [k for k in ("name", "kind", "steps", "guidance") if k not in data]
        if unknown or missing:
            raise ConfigError(
                f"{source}: not a table row"
                + (f"; unknown key(s) {unknown}" if unknown else "")
                + (f"; missing key(s) {missing}" if missing else "")
                + f" (a row has {sorted(known)})"
            )
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | Path) -> Row:
        """Read ``results/config/rows/<name>.yaml`` (``{"row": {...}}``, what the workflow writes)."""
        data = read_yaml(path)
        if not isinstance(data.get("row"), dict):
            raise ConfigError(f"{path}: not a row file (expected a mapping under 'row', as rapm.plan.row_file writes)")
        return cls.from_dict(data["row"], source=str(path))

    # --- read as a mapping of the written keys -----------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
