"""The pictures of a run, drawn from its run folder alone (so they can be redrawn at any time).

``write_plots(run_dir)`` writes into ``<run_dir>/plots/``:

- ``confusion_<row>.png``: the test confusion matrix of every leaderboard row, counts in the
  cells and colour normalised by row (the recall of each true class);
- ``reliability.png``: a reliability diagram of every row on test (15 equal-width bins);
- ``pareto.png``: test accuracy (with its interval) against inference cost, front marked;
- ``training_curves.png``: train and val loss and val accuracy per epoch of every member.

matplotlib is used through ``Figure`` objects and the Agg canvas only: no display, no pyplot
state, nothing to close.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .evaluation import DEFAULT_BINS, reliability_bins
from .runfolder import RunFolder, RunMemberCard

DPI = 100
MEMBER_COLOUR = "#1f77b4"
FUSER_COLOUR = "#d62728"
STUDENT_COLOUR = "#2ca02c"


@dataclass(frozen=True)
class Plot:
    """A drawn plot: ``kind`` is ``confusion`` (of the leaderboard row ``row``), ``reliability``,
    ``pareto`` or ``training``."""

    kind: str
    path: Path
    row: str | None = None


def write_plots(run_dir: str | Path, *, processes: int | None = None) -> list[Plot]:
    """Draw every plot of the run in ``run_dir`` into ``run_dir/plots``; return what was drawn.

    A plot whose inputs the folder lacks (no cost columns, no member history) is skipped. The
    figures are independent, and drawing them is most of a repeated run's time, so they are
    drawn by ``processes`` forked workers (default: one per core, at most 4; 1 draws here), unless
    torch or Ray is loaded, when forking is unsafe and they are drawn here.
    """
    run = RunFolder.complete(run_dir)
    run.plots_folder()  # made once here, before any worker writes into it
    names = [row["name"] for row in run.rows if row["name"] in run.probabilities("test")]
    tasks = [("confusion", name) for name in names] + [("reliability", None)] * bool(names) + [
        ("pareto", None), ("training", None)]
    processes = processes or min(4, _cores())
    if processes > 1 and len(tasks) > 2 and _safe_to_fork():  # a worker that dies leaves the drawing to this process
        import multiprocessing

        try:
            context = multiprocessing.get_context("fork")
        except ValueError:  # no fork (Windows): draw here
            context = None
        if context is not None:
            from concurrent.futures import ProcessPoolExecutor
            from concurrent.futures.process import BrokenProcessPool

            chunks = [chunk for chunk in (tasks[i::processes] for i in range(processes)) if chunk]
            try:
                with ProcessPoolExecutor(len(chunks), mp_context=context) as pool:
                    drawn = list(pool.map(_draw, [str(run.path)] * len(chunks), chunks))
            except (BrokenProcessPool, OSError):  # a worker killed (out of memory) or no process to fork
                pass
            else:
                by_task = {task: plot for chunk, plots in zip(chunks, drawn) for task, plot in zip(chunk, plots)}
                return [by_task[task] for task in tasks if by_task.get(task) is not None]
    return [plot for plot in _draw(run.path, tasks) if plot is not None]


def _safe_to_fork() -> bool:
    """Whether this process may fork: not once torch or Ray is loaded, whose thread pools (OpenMP
    spinning, gRPC) a forked child inherits half-alive and can hang on. A repeated run, the case
    worth speeding up, never imports either; a run that trained draws in its own process."""
    import sys

    return not any(name in sys.modules for name in ("torch", "ray"))


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _draw(run_dir: str | Path, tasks: list[tuple[str, str | None]]) -> list[Plot | None]:
    """Draw ``tasks`` (``("confusion", row)``, ``("reliability", None)``, ...); None where
    the folder lacks a plot's inputs."""
    run = RunFolder.complete(run_dir)
    proba = run.probabilities("test")
    y = run.labels("test")
    rows = {r["name"]: r for r in run.rows if r["name"] in proba}
    drawn: list[Plot | None] = []
    for kind, name in tasks:
        if kind == "confusion":
            row = rows[name]
            fig = confusion_figure(confusion_matrix(y, proba[name], len(run.classes)), run.classes,
                                   title=f"{name} ({row['kind']}): test accuracy {row['accuracy']:.4f}")
            file = f"confusion_{safe_filename(name)}.png"
        elif kind == "reliability":
            fig, file = reliability_figure(list(rows.values()), proba, y), "reliability.png"
        elif kind == "pareto":
            fig, file = pareto_figure(run.rows, best_member=run.leaderboard.get("best_member")), "pareto.png"
        else:
            fig, file = training_figure(run.cards), "training_curves.png"
        drawn.append(None if fig is None else Plot(kind, run.write_plot(file, fig, dpi=DPI), name))
    return drawn


def safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "_"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


# -- confusion matrices ---------------------------------------------------------------------------

def confusion_matrix(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``(C, C)``: true class by row, predicted class by column."""
    pred = np.argmax(proba, axis=1)
    return np.bincount(np.asarray(y_true) * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def confusion_figure(cm: np.ndarray, classes: list[str], *, title: str = ""):
    """Counts in the cells (up to 30 classes); colour: the share of the true class (row), from
    white (0) to dark blue (1), so the diagonal's colour is each class's recall."""
    n = len(classes)
    step = max(1, math.ceil(n / 40))
    ticks = np.arange(0, n, step)
    labels = [_short(classes[i]) for i in ticks]
    longest = max(map(len, labels), default=1)
    rotate = longest > 2
    font = 8 if n > 12 else 9
    # margins in inches: room for the class names (about 0.6 em per character) and the axis labels
    left = 0.45 + 0.075 * longest * font / 10
    bottom = 0.45 + (0.055 * longest * font / 10 if rotate else 0.2)
    cell = 0.42 if n <= 30 else 0.25
    grid = min(max(2.6, cell * n), 12.0)
    width, height = left + grid + 0.2, bottom + grid + 0.4
    fig = _figure(width, height)
    ax = fig.add_axes((left / width, bottom / height, grid / width, grid / height))
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    if n <= 30:
        size = 9 if n <= 12 else 7
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=size,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(ticks, labels, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor", fontsize=font)
    ax.set_yticks(ticks, labels, fontsize=font)
    ax.tick_params(length=0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10, loc="left")
    return fig


def _short(label: str, limit: int = 14) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


# -- reliability ----------------------------------------------------------------------------------

def reliability_figure(rows: list[dict], proba: dict[str, np.ndarray], y: np.ndarray, n_bins: int = DEFAULT_BINS):
    """One reliability diagram per row: accuracy per confidence bin (bars), the bin's mean
    confidence (black ticks, on the diagonal where calibrated), the share of samples (outline)."""
    n = len(rows)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    height = 2.7 * nrows + 0.5
    fig = _figure(2.8 * cols + 0.5, height)
    axes = fig.subplots(nrows, cols, squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(left=0.5 / (2.8 * cols + 0.5), right=0.98, top=1 - 0.3 / height, bottom=0.5 / height,
                        wspace=0.08, hspace=0.3)
    for ax, row in zip(axes.flat, rows):
        bins = reliability_bins(y, proba[row["name"]], n_bins)
        filled = bins.count > 0
        colour = FUSER_COLOUR if row["kind"] == "fuser" else MEMBER_COLOUR
        share = bins.count / max(bins.count.sum(), 1)
        ax.stairs(np.where(filled, bins.accuracy, 0.0), bins.edges, fill=True, color=colour, alpha=0.55, label="accuracy")
        ax.stairs(share, bins.edges, color="0.2", linewidth=0.9, label="share of samples")
        ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=0.8)
        centres = (bins.edges[:-1] + bins.edges[1:]) / 2
        ax.scatter(centres[filled], bins.confidence[filled], marker="_", color="black", s=60, linewidths=1.2,
                   label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{row['name']} ({row['kind']})", fontsize=9)
        ax.text(0.04, 0.95, f"ECE {bins.ece:.3f}", transform=ax.transAxes, fontsize=8, va="top")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("confidence (top class)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy", fontsize=8)
    axes.flat[0].legend(loc="center left", fontsize=7, frameon=False, bbox_to_anchor=(0.0, 0.62))
    return fig


# -- Pareto ---------------------------------------------------------------------------------------

def pareto_figure(rows: list[dict], *, best_member: str | None = None):
    """Test accuracy with its interval against inference milliseconds per image, or None when
    no row has a cost."""
    pts = [r for r in rows if _finite(r.get("infer_ms_per_image")) and _finite(r.get("accuracy"))]
    if not pts:
        return None
    fig = _figure(7.0, 4.6)
    ax = fig.add_axes((0.11, 0.12, 0.86, 0.8))
    cost = np.array([r["infer_ms_per_image"] for r in pts], dtype=float)
    acc = np.array([r["accuracy"] for r in pts], dtype=float)
    lo = np.array([r.get("accuracy_lo", np.nan) for r in pts], dtype=float)
    hi = np.array([r.get("accuracy_hi", np.nan) for r in pts], dtype=float)
    positive = cost[cost > 0]
    if len(positive) and positive.max() / positive.min() > 20 and (cost > 0).all():
        ax.set_xscale("log")
    on = np.array([bool(r.get("pareto")) for r in pts])
    order = np.argsort(cost[on])
    ax.step(cost[on][order], acc[on][order], where="post", color="0.5", linewidth=1, zorder=1, label="Pareto front")
    for kind, colour, marker in (("member", MEMBER_COLOUR, "o"), ("fuser", FUSER_COLOUR, "s"),
                                 ("student", STUDENT_COLOUR, "^")):
        sel = np.array([r["kind"] == kind for r in pts])
        if not sel.any():
            continue
        err = np.vstack([acc - lo, hi - acc])[:, sel]
        err = np.where(np.isfinite(err), err, 0)
        ax.errorbar(cost[sel], acc[sel], yerr=err, fmt="none", ecolor=colour, alpha=0.5, capsize=3, zorder=2)
        ax.scatter(cost[sel & on], acc[sel & on], color=colour, marker=marker, s=46, zorder=3, label=f"{kind}s (on front)")
        ax.scatter(cost[sel & ~on], acc[sel & ~on], facecolor="white", edgecolor=colour, marker=marker, s=46,
                   zorder=3, label=f"{kind}s (dominated)")
    ax.margins(x=0.18, y=0.08)
    ax.autoscale_view()
    labels = [r["name"] + (" (best member)" if r["name"] == best_member else "") for r in pts]
    _label_points(ax, cost, acc, labels)
    ax.set_xlabel("inference ms per image (fuser: its members' plus its own)")
    ax.set_ylabel("test accuracy (95% CI)")
    ax.set_title("accuracy against inference cost", fontsize=10, loc="left")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    return fig


def _label_points(ax, x: np.ndarray, y: np.ndarray, labels: list[str], fontsize: float = 8) -> None:
    """Name each point just right of it, pushing labels up where they would overlap (rows that
    share members share a cost), with a thin line back to a displaced label's point. The y axis
    grows to keep a pushed-up label inside it."""
    px_per_pt = ax.figure.dpi / 72.0
    line = 1.3 * fontsize * px_per_pt
    for _ in range(3):
        points = ax.transData.transform(np.column_stack([x, y]))  # pixels
        placed = _place_labels(points, labels, line, 0.6 * fontsize * px_per_pt, 6 * px_per_pt)
        top = max(bottom for _, _, bottom in placed.values()) + line
        overflow = top - ax.transAxes.transform((0, 1))[1]
        if overflow <= 0:
            break
        y_lo, y_hi = ax.get_ylim()
        height = ax.transAxes.transform((0, 1))[1] - ax.transAxes.transform((0, 0))[1]
        ax.set_ylim(y_lo, y_hi + 1.05 * overflow * (y_hi - y_lo) / max(height - overflow, 1.0))
    for i, (_, _, bottom) in placed.items():
        lift = (bottom - points[i][1]) / px_per_pt  # in points
        ax.annotate(labels[i], (x[i], y[i]), textcoords="offset points", xytext=(6, lift), fontsize=fontsize,
                    va="bottom", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3}
                    if lift > fontsize else None)


def _place_labels(points: np.ndarray, labels: list[str], line: float, char: float, gap: float) -> dict:
    """Left, right and bottom (pixels) of each label, from the lowest point up, none overlapping."""
    placed: dict[int, tuple[float, float, float]] = {}
    for i in np.lexsort((points[:, 0], points[:, 1])):
        px, py = points[i]
        left, bottom = px + gap, py + gap / 3
        right = left + char * len(labels[i])
        moved = True
        while moved:
            moved = False
            for other_left, other_right, other_bottom in placed.values():
                # a tolerance: (b + line) - b can round to just under line, which would loop forever
                if left < other_right and other_left < right and abs(bottom - other_bottom) < line * (1 - 1e-9):
                    bottom, moved = other_bottom + line, True
        placed[int(i)] = (left, right, bottom)
    return placed


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- training curves ------------------------------------------------------------------------------

def training_figure(cards: dict[str, RunMemberCard]):
    """Loss (train dashed, val solid) and val accuracy per epoch for every member with a history;
    the best epoch is marked. None when no member has one."""
    members = {name: card for name, card in cards.items() if card.history}
    if not members:
        return None
    from matplotlib import colormaps

    fig = _figure(10.0, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.14, wspace=0.22)
    cmap = colormaps["tab10"]
    for i, (name, card) in enumerate(members.items()):
        colour = cmap(i % 10)
        hist = card.history
        epochs = [h.get("epoch", k + 1) for k, h in enumerate(hist)]
        if any("train_loss" in h for h in hist):
            ax_loss.plot(epochs, [h.get("train_loss", np.nan) for h in hist], color=colour, linestyle="--", linewidth=1)
        ax_loss.plot(epochs, [h.get("val_loss", np.nan) for h in hist], color=colour, marker=".", label=name)
        ax_acc.plot(epochs, [h.get("val_accuracy", np.nan) for h in hist], color=colour, marker=".", label=name)
        best = card.best_epoch
        if best in epochs:
            k = epochs.index(best)
            ax_loss.scatter([best], [hist[k].get("val_loss", np.nan)], s=70, facecolor="none", edgecolor=colour, zorder=3)
            ax_acc.scatter([best], [hist[k].get("val_accuracy", np.nan)], s=70, facecolor="none", edgecolor=colour, zorder=3)
    ax_loss.set_title("loss (train dashed, val solid; circle: best epoch)", fontsize=9, loc="left")
    ax_acc.set_title("val accuracy", fontsize=9, loc="left")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=8, frameon=False, loc="lower right")
    return fig
