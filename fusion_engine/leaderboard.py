"""The leaderboard: one row per member and per fuser, every row scored on the same test samples.

Beside the metrics (plugins), every row gets the statistics that say whether a difference is
real (a paired bootstrap interval of accuracy and of the gain over the best member, an exact
McNemar test) and what it costs (parameters, inference time, training and fitting time, and
whether it is on the accuracy-vs-inference-cost Pareto front). docs/evaluation.md has every
column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import evaluation
from .records import SCORED_SPLITS

#: the cost keys :class:`Row.extra` may carry; each becomes a leaderboard column
COST_KEYS = ("n_params", "infer_ms_per_image", "train_seconds", "fit_seconds")

#: the columns that hold words, not numbers
TEXT_COLUMNS = ("name", "kind", "source", "members", "teacher")

#: cost columns a row may lack because the engine never saw the cost (shown as "unknown", never made up)
UNKNOWABLE = ("n_params", "infer_ms_per_image", "train_seconds")

#: columns the core adds after the metrics, in order (``pareto`` comes last, after the costs)
STAT_COLUMNS = ("accuracy_lo", "accuracy_hi", "delta_vs_best_member", "delta_vs_best_member_lo",
                "delta_vs_best_member_hi", "mcnemar_p")

#: the core's metrics (:mod:`fusion_engine.evaluation`): always on the leaderboard, and what chooses the best
#: member, breaks ties and fills the ``val_*`` columns, whatever metric plugins are installed
CORE_METRICS = {"accuracy": (evaluation.accuracy, True), "nll": (evaluation.nll, False)}

#: columns that can rank a leaderboard without being a registered metric, and their direction
CORE_RANKABLE = {**{name: hi for name, (_, hi) in CORE_METRICS.items()}, "delta_vs_best_member": True}


@dataclass
class Row:
    """One model to score: a member or a fuser, with its probabilities per split.

    ``proba`` holds ``"val"`` (out-of-fold for fitted fusers) and ``"test"``, each ``(N, C)``.

    ``extra`` carries what the runner measured; these keys become cost columns:

    - a member: ``n_params`` (int), ``infer_ms_per_image`` (its prediction time, in
      milliseconds per image, as measured in this run), ``train_seconds``;
    - a fuser: ``fit_seconds`` (fitting on val) and ``predict_ms_per_image`` (its own
      prediction time per image, on top of its members'; taken as 0 when absent). Its
      ``n_params`` and ``train_seconds`` are the sums over its members, computed here, and its
      ``infer_ms_per_image`` the sum of its members' weighted by ``consulted`` (the share of
      test samples it ran each member on; all of them when None) plus its own prediction time:
      a cascade's expected cost on test. A fuser may override any of them.

    A missing cost is NaN on the leaderboard (``fit_seconds`` of a member always is), and tables
    show the unknowable ones as "unknown": a member trained elsewhere has no ``train_seconds``, one
    read from predictions made elsewhere no ``n_params`` or ``infer_ms_per_image`` either, and a
    fuser over such a member none of its sums. Any other key in ``extra`` is appended as a column
    of its own.
    """

    name: str
    kind: str  # "member", "fuser" or "student"
    members: list[str]
    proba: dict[str, np.ndarray]
    weights: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # a member's: "trained", "weights", "predictions" or "zoo"; empty for a fuser
    consulted: list[float] | None = None  # a fuser's: per member, the share of test samples it ran it on


def network_row(network, n_scored: int, given_ms: float | None = None) -> Row:
    """The row of one network, a member or a student (a :class:`~fusion_engine.members.MemberResult`):
    its probabilities on val and test, and its cost columns: what this engine measured, None
    (unknown) where it did not see the cost (training done elsewhere; a network it never ran, whose
    predictions were made elsewhere). An inference cost the spec gives (``given_ms``) replaces the
    measured one. A student's row names its teacher."""
    from scipy.special import softmax

    source = network.source
    measured = 1000.0 * network.predict_seconds / max(1, n_scored) if source != "predictions" else None
    extra = {"n_params": network.n_params,
             "train_seconds": network.train_seconds if source in ("trained", "student") else None,
             "infer_ms_per_image": given_ms if given_ms is not None else measured}
    if source == "student":
        extra["teacher"] = network.card.teacher.name
    return Row(name=network.name, kind="student" if source == "student" else "member", source=source,
               members=[network.name], proba={s: softmax(network.logits[s].astype(np.float64), axis=1)
                                              for s in SCORED_SPLITS}, extra=extra)


def build_leaderboard(
    rows: list[Row],
    y: dict[str, np.ndarray],
    metrics: list,
    *,
    rank_by: str = "accuracy",
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
):
    """Score every row on test with every metric and the core statistics; rank by ``rank_by``.

    ``metrics`` are :class:`~fusion_engine.MetricRecord` objects, scored on test; the core's
    accuracy and NLL are added where they are missing, and scored on val too (``val_accuracy``,
    ``val_nll``). ``rank_by`` names one of them (or ``delta_vs_best_member``, which the core
    always computes) and is sorted in the direction its ``higher_is_better`` says; ties go to the
    lower test NLL, then to the cheaper row (``infer_ms_per_image``), then to the earlier row.

    The best member is the member with the highest val accuracy (ties: lower val NLL, then the
    earlier row); test never chooses it. Intervals are percentile intervals from ``n_bootstrap``
    resamples of the test samples drawn from ``seed``, the same resamples for every row.

    The frame's ``attrs`` record how it was built (``ranked_by``, ``best_member``,
    ``n_bootstrap``, ``bootstrap_seed``, ``confidence``, ``scored_on``);
    :meth:`fusion_engine.runfolder.RunFolder.write_leaderboard` writes them into ``leaderboard.json``.
    """
    import pandas as pd

    from .records import MetricRecord, normalize_name

    names = {m.name for m in metrics}
    metrics = [*metrics, *(MetricRecord(name, fn, higher_is_better=hi) for name, (fn, hi) in CORE_METRICS.items()
                           if name not in names)]
    directions = dict(CORE_RANKABLE)
    directions.update({m.name: m.higher_is_better for m in metrics})
    by_key = {normalize_name(name): name for name in directions}
    rank_col = by_key.get(normalize_name(rank_by))
    if rank_col is None:
        raise ValueError(f"cannot rank by '{rank_by}': choose one of: {', '.join(sorted(directions))}")

    y_test, y_val = np.asarray(y["test"]), np.asarray(y["val"])
    correct = evaluation.correct_matrix(y_test, [r.proba["test"] for r in rows])
    stats = _statistics(rows, correct, y_val, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    costs = _costs(rows)

    metric_names = [m.name for m in metrics]
    records = []
    for i, row in enumerate(rows):
        rec: dict[str, Any] = {"name": row.name, "kind": row.kind, "source": row.source, "members": _members_cell(row)}
        for m in metrics:
            rec[m.name] = m.fn(y_test, row.proba["test"])
        for col in STAT_COLUMNS:
            rec[col] = stats[col][i]
        for name, (fn, _) in CORE_METRICS.items():
            rec[f"val_{name}"] = fn(y_val, row.proba["val"])
        rec.update(costs[i])
        rec.update({k: v for k, v in row.extra.items() if k not in (*COST_KEYS, "predict_ms_per_image")})
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    # a metric that applies to no row (top-5 accuracy with 5 classes) is left off
    empty = [m for m in metric_names if m in df and df[m].isna().all() and m != rank_col]
    df = df.drop(columns=empty)
    df["n_params"] = df["n_params"].astype("Int64")
    cost = df["infer_ms_per_image"].to_numpy(float)
    pareto = pd.array(evaluation.pareto_front(df["accuracy"].to_numpy(float), cost), dtype="boolean")
    pareto[~np.isfinite(cost)] = pd.NA  # unknown without a cost, rather than "no"
    df.insert(df.columns.get_loc("fit_seconds") + 1, "pareto", pareto)

    # ties: lower test NLL, then the cheaper row, then the order of ``rows``
    order = [(rank_col, directions[rank_col])]
    if "nll" in df and rank_col != "nll":
        order.append(("nll", False))
    order.append(("infer_ms_per_image", False))
    df = df.sort_values([c for c, _ in order], ascending=[not hi for _, hi in order], kind="stable", na_position="last")
    df.insert(0, "rank", range(1, len(df) + 1))
    df = df.reset_index(drop=True)
    df.attrs = {"ranked_by": rank_col, "best_member": stats["best_member"], "scored_on": "test",
                "n_bootstrap": int(n_bootstrap), "bootstrap_seed": int(seed), "confidence": float(confidence)}
    return df


def best_member_index(rows: list[Row], y_val: np.ndarray) -> int | None:
    """The member row with the highest val accuracy (ties: lower val NLL, then the earlier row)."""
    best, best_key = None, None
    for i, row in enumerate(rows):
        if row.kind != "member":
            continue
        if not len(y_val):
            return i  # nothing to choose on: the first member
        key = (-evaluation.accuracy(y_val, row.proba["val"]), evaluation.nll(y_val, row.proba["val"]))
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


@dataclass
class BudgetChoice:
    """The row :func:`best_within_budget` chose, and on what."""

    budget_ms: float
    row: dict | None  # None: no row with a known cost fits
    chosen_by: str  # the val column it was chosen on
    n_fit: int  # rows whose cost fits the budget
    n_unknown: int  # rows whose cost is unknown, left out
    n_known: int = 0  # rows whose cost is known

    def sentence(self, level: int = 95) -> str:
        """One line for a person: the row, its test accuracy with its interval, and its cost."""
        budget = f"{self.budget_ms:g} ms per image"
        unknown = f" ({self.n_unknown} rows of unknown cost left out)" if self.n_unknown else ""
        if self.n_unknown and not self.n_known:
            return f"no row of this leaderboard has a known inference cost, so none can be chosen within {budget}"
        if self.row is None:
            return f"no row's inference cost fits {budget}{unknown}"
        r = self.row
        return (f"best within {budget}: {r['name']} ({r['kind']}), chosen on {self.chosen_by} "
                f"{format_value(r[self.chosen_by], self.chosen_by)} among {self.n_fit} rows that fit{unknown}: test "
                f"accuracy {with_interval(r.get('accuracy'), r.get('accuracy_lo'), r.get('accuracy_hi'))} "
                f"({level}% CI) at {format_value(r.get('infer_ms_per_image'), 'infer_ms_per_image')} ms per image")

    def as_dict(self) -> dict:
        return {"budget_ms": self.budget_ms, "chosen_by": self.chosen_by, "rows_within_budget": self.n_fit,
                "rows_of_unknown_cost": self.n_unknown, "row": self.row}


def best_within_budget(rows: list[dict], budget_ms: float, *, ranked_by: str = "accuracy") -> BudgetChoice:
    """The best leaderboard row (``rows``: the records of ``leaderboard.json``) whose
    ``infer_ms_per_image`` is at most ``budget_ms``.

    Chosen on val, like the best member, never on test: by the val score of the ranking metric
    where the leaderboard has one (``val_accuracy``, ``val_nll``), else ``val_accuracy``; ties go
    to the lower ``val_nll``, then the cheaper row. A row whose cost is unknown is left out.
    """
    column = f"val_{ranked_by}" if f"val_{ranked_by}" in CORE_METRICS_VAL else "val_accuracy"
    higher = CORE_METRICS[column.removeprefix("val_")][1]
    known = [r for r in rows if _finite(r.get("infer_ms_per_image"))]
    fits = [r for r in known if float(r["infer_ms_per_image"]) <= budget_ms]

    def key(r: dict) -> tuple:
        score = float(r[column]) if _finite(r.get(column)) else -math.inf if higher else math.inf
        nll = float(r["val_nll"]) if _finite(r.get("val_nll")) else math.inf
        return (-score if higher else score, nll, float(r["infer_ms_per_image"]))

    best = min(fits, key=key) if fits else None
    return BudgetChoice(float(budget_ms), best, column, len(fits), len(rows) - len(known), len(known))


#: the val columns :func:`best_within_budget` can choose on
CORE_METRICS_VAL = tuple(f"val_{name}" for name in CORE_METRICS)


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _statistics(rows, correct, y_val, *, n_bootstrap, seed, confidence) -> dict[str, Any]:
    n_rows = len(rows)
    nan = np.full(n_rows, np.nan)
    lo, hi = evaluation.bootstrap_accuracy(correct, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    out: dict[str, Any] = {"accuracy_lo": lo, "accuracy_hi": hi, "best_member": None}
    best = best_member_index(rows, y_val)
    if best is None:
        out.update({c: nan for c in STAT_COLUMNS[2:]})
        return out
    delta, dlo, dhi = evaluation.bootstrap_delta(correct, best, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    p = np.array([np.nan if i == best else evaluation.mcnemar_exact(correct[i], correct[best]).p_value
                  for i in range(n_rows)])
    out.update({"delta_vs_best_member": delta, "delta_vs_best_member_lo": dlo, "delta_vs_best_member_hi": dhi,
                "mcnemar_p": p, "best_member": rows[best].name})
    return out


def _costs(rows: list[Row]) -> list[dict[str, Any]]:
    """Per row: the cost columns; a fuser's are the sums over its members (see :class:`Row`)."""
    member_cost = {r.name: r.extra for r in rows if r.kind == "member"}
    networks = ("member", "student")  # rows that are one network: their own costs

    def total(names: list[str], key: str, shares: list[float] | None = None) -> float:
        values = [member_cost.get(n, {}).get(key) for n in names]
        if not values or any(v is None for v in values):
            return float("nan")
        return float(sum(v * share for v, share in zip(values, shares or [1.0] * len(values))))

    out = []
    for row in rows:
        if row.kind in networks:
            cost = {k: row.extra.get(k) for k in COST_KEYS}
        else:
            cost = {
                "n_params": total(row.members, "n_params"),
                "infer_ms_per_image": total(row.members, "infer_ms_per_image", row.consulted)
                + float(row.extra.get("predict_ms_per_image", 0.0)),
                "train_seconds": total(row.members, "train_seconds"),
                "fit_seconds": row.extra.get("fit_seconds"),
            }
            cost.update({k: row.extra[k] for k in COST_KEYS if k in row.extra})
        out.append({k: float("nan") if v is None else v for k, v in cost.items()})
    return out


def _members_cell(row: Row) -> str:
    if row.weights is None:
        return ", ".join(row.members)
    return ", ".join(f"{m}:{w:.2f}" for m, w in zip(row.members, row.weights))


# -- text rendering -------------------------------------------------------------------------------

def format_value(value: Any, column: str = "") -> str:
    """One cell as text: scores to 4 decimals, p-values, times and sizes to 3 significant digits."""
    import pandas as pd

    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if column == "n_params":
            return f"{int(value):,}"
        if column == "mcnemar_p":
            return "<0.0001" if value < 1e-4 else f"{value:.4f}"
        if column.endswith(("_seconds", "_ms_per_image")):
            return f"{value:.3g}" if value < 100 else f"{value:.0f}"
        if column.startswith("delta_vs_best_member"):
            return f"{value:+.4f}"
        return f"{value:.4f}"
    if isinstance(value, (int, np.integer)) and column == "n_params":
        return f"{value:,}"
    return str(value)


def _numeric(column) -> bool:
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    return is_numeric_dtype(column.dtype) and not is_bool_dtype(column.dtype)


def to_markdown(df) -> str:
    header = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---:" if _numeric(df[c]) else "---" for c in df.columns) + "|"
    lines = [header, rule]
    for rec in df.itertuples(index=False):
        lines.append("| " + " | ".join(format_value(v, c).replace("|", "\\|") for c, v in zip(df.columns, rec)) + " |")
    return "\n".join(lines) + "\n"


def with_interval(value: Any, lo: Any, hi: Any, column: str = "") -> str:
    """``0.9533 [0.9300, 0.9717]``; the point alone when the interval is unknown."""
    point = format_value(value, column)
    if not point:
        return ""
    low, high = format_value(lo, column), format_value(hi, column)
    return f"{point} [{low}, {high}]" if low and high else point


#: the columns :func:`print_leaderboard` shows on a terminal (the files hold every column)
TERMINAL_COLUMNS = ("mcnemar_p", "f1_macro", "nll", "ece", "n_params", "infer_ms_per_image", "pareto")

_MERGED = {"accuracy": ("accuracy_lo", "accuracy_hi"),
           "delta_vs_best_member": ("delta_vs_best_member_lo", "delta_vs_best_member_hi")}


def summary_table(df, columns: tuple[str, ...] | None = None) -> tuple[list[str], list[list[str]]]:
    """The leaderboard as text cells, each interval joined to its estimate.

    ``columns`` picks what follows rank, name, kind, members, accuracy and the delta (and the
    ranking column, when it is another); by default every other column. Used by
    :func:`print_leaderboard` and the HTML report.
    """
    level = int(round(100 * df.attrs.get("confidence", 0.95)))
    best = df.attrs.get("best_member")
    hidden = {c for pair in _MERGED.values() for c in pair}
    head = ["rank", "name", "kind", "source", "members", "accuracy", "delta_vs_best_member"]
    ranked = df.attrs.get("ranked_by")
    if ranked and ranked not in head:
        head.append(ranked)
    if columns is None:
        columns = tuple(c for c in df.columns if c not in head and c not in hidden)
    chosen = [c for c in (*head, *columns) if c in df and c not in hidden]
    chosen = list(dict.fromkeys(chosen))
    titles = {"accuracy": f"accuracy [{level}% CI]",
              "delta_vs_best_member": f"Δ accuracy vs {best} [{level}% CI]" if best else "Δ vs best member"}
    body = []
    for _, rec in df.iterrows():
        cells = []
        for col in chosen:
            if col == "delta_vs_best_member" and rec["name"] == best:
                cells.append("best member (val)")
            elif col in _MERGED:
                lo, hi = _MERGED[col]
                cells.append(with_interval(rec.get(col), rec.get(lo), rec.get(hi), col))
            elif col in UNKNOWABLE and not format_value(rec.get(col), col):
                cells.append("unknown")  # a cost this engine did not see: training or a network run elsewhere
            else:
                cells.append(format_value(rec.get(col), col))
        body.append(cells)
    return [titles.get(c, c) for c in chosen], body


def print_leaderboard(df, *, title: str, console=None, full: bool = False) -> None:
    """The leaderboard as a rich table on stdout: the columns a person reads first, or every
    column with ``full``."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: don't fold columns to 80 characters
            console = Console(width=max(console.width, 200))
    header, body = summary_table(df, None if full else TERMINAL_COLUMNS)
    table = Table(title=title, title_justify="left")
    for col in header:
        text = col in TEXT_COLUMNS
        table.add_column(col, justify="left" if text else "right", no_wrap=col != "members", overflow="fold")
    for cells in body:
        table.add_row(*cells)
    console.print(table)
    if not full and df.attrs.get("best_member"):
        console.print(f"Δ and mcnemar_p compare each row with the best member on val, {df.attrs['best_member']}; "
                      f"intervals: paired bootstrap over the test samples ({df.attrs.get('n_bootstrap')} resamples). "
                      "Every column is in leaderboard.md.")
