"""How the tables are written: a measured number with its interval (:class:`Value`), and a table as
Markdown, LaTeX (numbers rendered ``0.045 ± 0.003 (0.040, 0.051)``) or CSV (intervals in columns of their own).
"""

from __future__ import annotations

from typing import Any

import pandas as pd


class Value(float):
    """A measured number with its 95% interval (``lo``, ``hi``), the standard deviation over training seeds
    (``sd``, for a mean over replicates) and an optional significance mark; a float for arithmetic and CSV,
    rendered ``0.045 ± 0.003 (0.040, 0.051)`` in Markdown and LaTeX."""

    def __new__(
        cls, value: float, lo: float | None = None, hi: float | None = None, mark: str = "", sd: float | None = None
    ):
        obj = super().__new__(cls, value)
        obj.lo, obj.hi, obj.mark, obj.sd = lo, hi, mark, sd
        return obj


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, Value):
        text = _fmt(float(value), digits)
        if value.sd is not None:
            text += f" ± {_fmt(float(value.sd), digits)}"
        if value.lo is not None:
            text += f" ({_fmt(float(value.lo), digits)}, {_fmt(float(value.hi), digits)})"
        return text + value.mark
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1 and abs(value) < 1e6:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.{digits + 1 if abs(value) < 1 else digits}f}"  # 3 decimals below 1 (toy distances, accuracies)
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(df: pd.DataFrame, caption: str) -> str:
    esc = lambda s: (
        str(s)
        .replace("\\", "\\textbackslash{}")
        .replace("&", "\\&")
        .replace("%", "\\%")
        .replace("_", "\\_")
        .replace("#", "\\#")
    )  # noqa: E731
    body = [" & ".join(esc(_fmt(v)) for v in row) + " \\\\" for row in df.itertuples(index=False)]
    return (
        "\n".join(
            [
                "\\begin{table}[t]",
                "\\centering",
                f"\\caption{{{esc(caption)}}}",
                "\\begin{tabular}{" + "l" * len(df.columns) + "}",
                "\\toprule",
                " & ".join(esc(c) for c in df.columns) + " \\\\",
                "\\midrule",
                *body,
                "\\bottomrule",
                "\\end{tabular}",
                "\\end{table}",
            ]
        )
        + "\n"
    )


def expand_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """For CSV: every column holding :class:`Value` s gets ``<col> low`` / ``<col> high`` columns (and
    ``<col> significant`` for differences) next to it; the values themselves become plain floats."""
    out = {}
    for col in df.columns:
        values = list(df[col])
        out[col] = [float(v) if isinstance(v, Value) else v for v in values]
        if any(isinstance(v, Value) and v.sd is not None for v in values):
            out[f"{col} sd over seeds"] = [v.sd if isinstance(v, Value) else None for v in values]
        if any(isinstance(v, Value) and v.lo is not None for v in values):
            out[f"{col} low"] = [v.lo if isinstance(v, Value) else None for v in values]
            out[f"{col} high"] = [v.hi if isinstance(v, Value) else None for v in values]
            if "Δ" in col:
                out[f"{col} significant"] = [
                    (v.mark == "*") if isinstance(v, Value) and v.lo is not None else None for v in values
                ]
    return pd.DataFrame(out)
