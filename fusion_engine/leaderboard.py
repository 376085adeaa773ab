"""The leaderboard: one row per member and per fuser, every row scored on the same test samples."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.json")


@dataclass
class Row:
    """One model to score: a member or a fuser, with its probabilities per split."""

    name: str
    kind: str  # "member" or "fuser"
    members: list[str]
    proba: dict[str, np.ndarray]  # "val" (out-of-fold for fitted fusers) and "test"
    weights: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_leaderboard(rows: list[Row], y: dict[str, np.ndarray], metrics: list, *, rank_by: str = "accuracy"):
    """Score every row with every metric on test (and accuracy, nll on val); rank by ``rank_by``.

    ``metrics`` are :class:`~fusion_engine.MetricRecord` objects; ties in ``rank_by`` are broken
    by test NLL where it is among them.
    """
    import pandas as pd

    by_name = {m.name: m for m in metrics}
    if rank_by not in by_name:
        raise ValueError(f"cannot rank by '{rank_by}': not a registered metric")
    records = []
    for row in rows:
        rec: dict[str, Any] = {"name": row.name, "kind": row.kind, "members": _members_cell(row)}
        for m in metrics:
            rec[m.name] = m.fn(y["test"], row.proba["test"])
        for m in metrics:
            if m.name in ("accuracy", "nll"):
                rec[f"val_{m.name}"] = m.fn(y["val"], row.proba["val"])
        rec.update(row.extra)
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    order = [(rank_by, by_name[rank_by].higher_is_better)]
    if "nll" in by_name and rank_by != "nll":
        order.append(("nll", False))
    df = df.sort_values([c for c, _ in order], ascending=[not hi for _, hi in order], kind="stable")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def _members_cell(row: Row) -> str:
    if row.weights is None:
        return ", ".join(row.members)
    return ", ".join(f"{m}:{w:.2f}" for m, w in zip(row.members, row.weights))


def write_leaderboard(df, run_dir: Path, *, meta: dict[str, Any]) -> list[Path]:
    """Write ``leaderboard.csv``, ``.md`` and ``.json`` into ``run_dir``."""
    run_dir = Path(run_dir)
    paths = [run_dir / name for name in FILES]
    df.to_csv(paths[0], index=False)
    paths[1].write_text(to_markdown(df), encoding="utf-8")
    payload = {**meta, "rows": json.loads(df.to_json(orient="records", double_precision=15))}
    paths[2].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return paths


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return f"{value:.4f}"
    return str(value)


def _numeric(column) -> bool:
    from pandas.api.types import is_numeric_dtype

    return is_numeric_dtype(column.dtype)


def to_markdown(df) -> str:
    header = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---:" if _numeric(df[c]) else "---" for c in df.columns) + "|"
    lines = [header, rule]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in rec) + " |")
    return "\n".join(lines) + "\n"


def print_leaderboard(df, *, title: str, console=None) -> None:
    """The leaderboard as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: don't fold columns to 80 characters
            console = Console(width=max(console.width, 200))
    table = Table(title=title, title_justify="left")
    for col in df.columns:
        table.add_column(col, justify="right" if _numeric(df[col]) else "left", overflow="fold")
    for rec in df.itertuples(index=False):
        table.add_row(*(_fmt(v) for v in rec))
    console.print(table)
