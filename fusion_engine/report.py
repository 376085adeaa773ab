"""A run's report: one self-contained ``report.html`` rendered from the run folder alone.

Everything a reader needs is in the file: the leaderboard with its intervals, what each fuser
gained over the best member and whether that could be noise, the plots (PNG, base64-embedded),
each fuser's weights or meta-learner, the data split and the resolved spec. No script, no
stylesheet or image from anywhere else, so it opens offline and can be mailed as is. Every piece
of user text (names, class names, the spec) is HTML-escaped.
"""

from __future__ import annotations

import base64
import json
import math
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .jsoncodec import from_jsonable
from .records import SPLITS
from .runfolder import RunFolder

if TYPE_CHECKING:  # pragma: no cover
    from .plots import Plot


def write_report(run_dir: str | Path, plots: list["Plot"], *, budget_ms: float | None = None) -> Path:
    """Render ``<run_dir>/report.html`` from the run folder, with ``plots`` (what
    :func:`~fusion_engine.plots.write_plots` drew) embedded; return its path. ``budget_ms``
    (default: the spec's ``budget_ms``) names the best row that fits it in the summary."""
    run = RunFolder.complete(run_dir)
    return run.write_report(render_report(run, plots, budget_ms=budget_ms))


# -- rendering ------------------------------------------------------------------------------------

def render_report(run: RunFolder, plots: list["Plot"], *, budget_ms: float | None = None) -> str:
    board = run.leaderboard
    title = board.get("experiment") or run.summary.get("experiment") or run.path.name
    if budget_ms is None:
        budget_ms = run.spec.get("budget_ms")
    sections = [
        ("summary", "Summary", _summary(run, budget_ms)),
        ("leaderboard", "Leaderboard", _leaderboard(run)),
        ("data", "Data", _data(run)),
    ]
    by_kind: dict[str, list[Path]] = {}
    for plot in plots:
        by_kind.setdefault(plot.kind, []).append(Path(plot.path))
    if "pareto" in by_kind:
        sections.append(("cost", "Accuracy and cost", _figure(by_kind.pop("pareto")[0],
                         "Test accuracy (bars: 95% interval) against inference time per image. Filled marks "
                         "are on the Pareto front: no other row is both at least as accurate and at most as costly.")))
    if "reliability" in by_kind:
        sections.append(("calibration", "Calibration", _figure(by_kind.pop("reliability")[0],
                         "Reliability on test: samples binned by their top-class probability into 15 equal-width bins. "
                         "Bars: the fraction right in each bin; black ticks: the bin's mean confidence, on the dashed "
                         "diagonal for a calibrated model. Bars below their tick mean overconfidence; ECE is the "
                         "sample-weighted mean gap. The outline is the share of samples per bin: a bin holding few "
                         "samples says little.")))
    confusion = by_kind.pop("confusion", [])
    if confusion:
        sections.append(("confusion", "Confusion matrices",
                         "<p class='note'>Test samples; rows are the true class. Cells hold counts; the colour is "
                         "the share of the true class, so the diagonal's colour is each class's recall.</p>"
                         + "<div class='grid'>" + "".join(_image(p) for p in confusion) + "</div>"))
    members_html = ""
    if "training" in by_kind:
        members_html = _figure(by_kind.pop("training")[0], "Per epoch: loss on train (dashed) and val "
                               "(solid), and val accuracy; the circle marks the epoch kept (lowest val loss).")
    members_html += _members(run)
    sections.append(("members", "Members", members_html))
    sections.append(("fusers", "Fusers", _fusers(run)))
    more = [path for paths in by_kind.values() for path in paths]
    if more:  # plots of kinds this report does not place: shown, never dropped
        sections.append(("more", "More plots", "<div class='grid'>" + "".join(_image(p) for p in more) + "</div>"))
    if run.spec_text is not None:
        sections.append(("spec", "Spec", "<details><summary>The resolved spec (spec.yaml): every default filled in"
                         f"</summary><pre>{escape(run.spec_text)}</pre></details>"))
    sections.append(("run", "Run", _run_info(run)))

    nav = " · ".join(f"<a href='#{sid}'>{escape(label)}</a>" for sid, label, _ in sections)
    body = "\n".join(f"<section id='{sid}'><h2>{escape(label)}</h2>\n{content}\n</section>" for sid, label, content in sections)
    sub = " · ".join(escape(str(x)) for x in (
        board.get("run_id") or run.path.name, run.summary.get("status"), run.summary.get("started"),
        f"{run.summary['seconds']:.0f} s" if isinstance(run.summary.get("seconds"), (int, float)) else None,
    ) if x)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(str(title))}: fusion-engine report</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{escape(str(title))}</h1><p class="sub">{sub}</p><nav>{nav}</nav></header>
<main>
{body}
</main>
</body>
</html>
"""


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2329;margin:0;background:#fafbfc}
header{background:#fff;border-bottom:1px solid #dfe3e8;padding:18px 32px 10px}
h1{margin:0 0 2px;font-size:24px}
h2{font-size:19px;margin:0 0 10px;border-bottom:1px solid #e6e9ed;padding-bottom:4px}
h3{font-size:16px;margin:16px 0 6px}
.sub{color:#5c6670;margin:0 0 8px;font-size:13px}
nav a{color:#0b5cad;text-decoration:none;font-size:14px}
main{padding:8px 32px 40px;max-width:1500px}
section{margin:22px 0 30px}
.note{color:#5c6670;font-size:13px;margin:4px 0 10px;max-width:900px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;background:#fff}
th,td{border:1px solid #e1e5ea;padding:4px 8px;vertical-align:top}
th{background:#f1f3f6;text-align:left;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.fuser td:first-child{border-left:3px solid #d62728}
tr.member td:first-child{border-left:3px solid #1f77b4}
tr.best td{background:#f3f8fe}
td.gain{color:#157a2f;font-weight:600}
td.loss{color:#b3261e;font-weight:600}
ul.verdicts{padding-left:20px;max-width:1000px}
ul.verdicts li{margin:3px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:14px}
figure{margin:0 0 8px;background:#fff;border:1px solid #e1e5ea;padding:8px;max-width:fit-content}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#5c6670;max-width:900px;margin-top:4px}
pre{background:#fff;border:1px solid #e1e5ea;padding:10px;font-size:12.5px;overflow-x:auto;max-width:1000px}
.bar{display:inline-block;height:10px;background:#d62728;opacity:.7;vertical-align:middle}
.cards{display:flex;flex-wrap:wrap;gap:16px 28px;align-items:flex-start}
.cards>div{max-width:560px}
details{margin-top:12px}
summary{cursor:pointer;color:#0b5cad;font-size:14px;margin-bottom:6px}
"""


def _num(value: Any, column: str = "") -> str:
    from .leaderboard import format_value

    return format_value(value, column)


def _table(header: list[str] | None, body: list[list[str]], *, numeric: set[int] = frozenset(),
           row_classes: list[str] | None = None, raw: set[int] = frozenset()) -> str:
    """An HTML table (no header row when ``header`` is None); cells are escaped unless their
    column is in ``raw``; a cell may be ``(text, css_class)``."""
    head = "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    lines = []
    for r, cells in enumerate(body):
        cls = f" class='{row_classes[r]}'" if row_classes and row_classes[r] else ""
        tds = []
        for i, cell in enumerate(cells):
            attr = ""
            if isinstance(cell, tuple):  # (text, css class)
                cell, extra = cell
                attr = f" class='{extra}{' num' if i in numeric else ''}'"
            elif i in numeric:
                attr = " class='num'"
            tds.append(f"<td{attr}>{cell if i in raw else escape(str(cell))}</td>")
        lines.append(f"<tr{cls}>{''.join(tds)}</tr>")
    return f"<div class='scroll'><table>{head}<tbody>{''.join(lines)}</tbody></table></div>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<figure><img alt='{escape(path.name, quote=True)}' src='data:image/png;base64,{data}'></figure>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{escape(path.name, quote=True)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _verdict(row: dict) -> tuple[str, str]:
    lo, hi = row.get("delta_vs_best_member_lo"), row.get("delta_vs_best_member_hi")
    if not (_finite(lo) and _finite(hi)):
        return "", ""
    if lo == hi == 0 and row.get("delta_vs_best_member") == 0:
        return "", "right and wrong on exactly the same test samples as the best member"
    if lo > 0:
        return "gain", "better than the best member: the whole interval is above 0"
    if hi < 0:
        return "loss", "worse than the best member: the whole interval is below 0"
    return "", "not distinguishable from the best member: the interval includes 0"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _summary(run: RunFolder, budget_ms: float | None = None) -> str:
    board = run.leaderboard
    rows = run.rows
    n_test = run.split_sizes.get("test")
    level = int(round(100 * board.get("confidence", 0.95)))
    best = board.get("best_member")
    by_name = {r["name"]: r for r in rows}
    items = []
    lead = (f"Every row is scored on the same {n_test} test samples. " if n_test else "") + \
        f"Ranked by test <b>{escape(str(board.get('ranked_by', 'accuracy')))}</b>."
    if best in by_name:
        b = by_name[best]
        lead += (f" The best member, chosen on val accuracy (never on test), is <b>{escape(best)}</b>: test accuracy "
                 f"{_num(b['accuracy'])} [{_num(b.get('accuracy_lo'))}, {_num(b.get('accuracy_hi'))}].")
    for row in rows:
        if row.get("kind") != "fuser":
            continue
        cls, words = _verdict(row)
        if not words:
            continue
        p = row.get("mcnemar_p")
        p_text = (f"; McNemar p {'< 0.0001' if p < 1e-4 else '= ' + _num(p, 'mcnemar_p')}") if _finite(p) else ""
        items.append(
            f"<li><b>{escape(row['name'])}</b>: Δ accuracy {_num(row['delta_vs_best_member'], 'delta_vs_best_member')} "
            f"[{_num(row['delta_vs_best_member_lo'], 'delta_vs_best_member')}, "
            f"{_num(row['delta_vs_best_member_hi'], 'delta_vs_best_member')}]{p_text}: "
            f"<span class='{'gain' if cls == 'gain' else 'loss' if cls == 'loss' else ''}'>{escape(words)}</span>.</li>")
    front = [r["name"] for r in rows if r.get("pareto")]
    html = f"<p>{lead}</p>"
    if items:
        html += f"<p>Each fuser against {escape(str(best))} ({level}% paired bootstrap interval of the difference):</p>"
        html += f"<ul class='verdicts'>{''.join(items)}</ul>"
    if front:
        html += f"<p>On the accuracy-vs-inference-cost Pareto front: {escape(', '.join(front))}.</p>"
    if budget_ms:
        from .leaderboard import best_within_budget

        choice = best_within_budget(rows, float(budget_ms), ranked_by=board.get("ranked_by", "accuracy"))
        sentence = choice.sentence(level)
        html += f"<p class='budget'>{escape(sentence[0].upper() + sentence[1:])}.</p>"
    html += ("<p class='note'>Intervals come from resampling the test samples with the same resamples for every row "
             f"({board.get('n_bootstrap', '?')} resamples, seed {board.get('bootstrap_seed', '?')}). McNemar p-values are "
             "not corrected for the number of rows compared. docs/evaluation.md explains every column.</p>")
    return html


#: the leaderboard columns the report's main table shows; every column is under "every column"
REPORT_COLUMNS = ("mcnemar_p", "f1_macro", "top5_accuracy", "nll", "brier", "ece", "val_accuracy", "n_params",
                  "infer_ms_per_image", "pareto")


def _leaderboard(run: RunFolder) -> str:
    import pandas as pd

    rows = run.rows
    if not rows:
        return "<p>No rows.</p>"
    df = pd.DataFrame.from_records(rows)
    df.attrs = {k: v for k, v in run.leaderboard.items() if k != "rows"}
    note = ("<p class='note'>Scored on test unless the column says val; intervals in brackets. Δ is the accuracy "
            "difference from the best member (chosen on val) with its paired interval: green when the whole interval "
            "is above 0, red when it is below. A fuser's parameters and inference time are the sums over its members "
            "(plus its own inference). Left edge: <span style='color:#d62728'>fuser</span>, "
            "<span style='color:#1f77b4'>member</span>; shaded: the best member.</p>")
    return (note + _board_table(df, REPORT_COLUMNS, rows)
            + "<details><summary>Every column</summary>" + _board_table(df, None, rows) + "</details>")


def _board_table(df, columns, rows: list[dict]) -> str:
    from .leaderboard import TEXT_COLUMNS, summary_table

    header, body = summary_table(df, columns)
    numeric = {i for i, h in enumerate(header) if h not in TEXT_COLUMNS}
    delta_col = next((i for i, h in enumerate(header) if h.startswith("Δ")), None)
    best = df.attrs.get("best_member")
    classes = []
    for r, row in enumerate(rows):
        classes.append(" ".join(filter(None, [row.get("kind"), "best" if row["name"] == best else ""])))
        cls, _ = _verdict(row)
        if delta_col is not None and cls:
            body[r][delta_col] = (body[r][delta_col], cls)
    return _table(header, body, numeric=numeric, row_classes=classes)


def _data(run: RunFolder) -> str:
    sizes = run.split_sizes
    classes = run.classes
    body = [[s, str(n)] for s, n in sizes.items()]
    html = _table(["split", "samples"], body, numeric={1})
    counts = {s: np.bincount(run.labels(s), minlength=len(classes)) for s in SPLITS if s in run.split}
    if counts and len(classes) <= 60:
        head = ["class", *counts]
        rows = [[c, *(str(int(counts[s][i])) for s in counts)] for i, c in enumerate(classes)]
        html += f"<h3>Samples per class ({len(classes)} classes)</h3>" + _table(head, rows, numeric=set(range(1, len(head))))
    else:
        html += f"<p>{len(classes)} classes: {escape(', '.join(classes))}</p>"
    return html


def _members(run: RunFolder) -> str:
    if not run.cards:
        return ""
    val_accuracy = {r["name"]: r.get("val_accuracy") for r in run.rows}
    with_action = any(card.action is not None for card in run.cards.values())
    header = ["member", "backbone", *(["this run"] if with_action else []), "params", "epochs run", "best epoch",
              "val accuracy", "train s", "predict s", "temperature"]
    body = []
    for name, card in run.cards.items():
        body.append([name, card.backbone or "", *([str(card.action or "")] if with_action else []),
                     _num(card.n_params, "n_params"), str(len(card.history or [])),
                     str(card.best_epoch),  # "None" for a member not trained: as reports have always shown it
                     _num(val_accuracy.get(name, card.val_accuracy)),
                     _num(card.train_seconds, "train_seconds"), _num(card.predict_seconds, "train_seconds"),
                     _num(card.temperature)])
    first_number = 3 if with_action else 2
    return _table(header, body, numeric=set(range(first_number, len(header))))


def _fusers(run: RunFolder) -> str:
    if not run.fusers:
        return "<p>No fusers.</p>"
    parts = []
    for name, info in run.fusers.items():
        members = [str(m) for m in info.get("members", [])]
        params = json.dumps(info.get("params", {}), sort_keys=True)
        rows = [["fuser", str(info.get("fuser", ""))], ["plugin", str(info.get("plugin", ""))],
                ["members", ", ".join(members)], ["params", params]]
        if info.get("temperature"):
            rows.append(["temperature option", "on"])
        html = f"<h3>{escape(name)}</h3>" + _table(None, rows)
        html += _usage(info.get("test_usage"), members)
        html += _state_summary(_with_importance(info), members)
        parts.append(f"<div>{html}</div>")
    return "<div class='cards'>" + "".join(parts) + "</div>"


def _usage(usage: dict | None, members: list[str]) -> str:
    """For a fuser that stops early (a cascade): how many test samples ran each member, and how
    many stopped after 1, 2, ... members."""
    if not usage:
        return ""
    consulted = usage.get("consulted", {})
    stopped = usage.get("stopped_after") or []
    total = sum(stopped) or 1
    order = sorted(members, key=lambda m: -float(consulted.get(m, 1.0)))
    body = [[str(k + 1), m, f"{100 * float(consulted.get(m, 1.0)):.1f}%",
             f"{stopped[k]} ({100 * stopped[k] / total:.1f}%)" if k < len(stopped) else ""]
            for k, m in enumerate(order)]
    return ("<p class='note'>On test: the share of samples each member ran on, and how many samples stopped "
            "there (answered by the members up to that one).</p>"
            + _table(["stage", "member", "ran on", "answered here"], body, numeric={0, 2, 3}))


_BOOKKEEPING = {"n_members_", "n_classes_", "classes_"}


def _with_importance(info: dict) -> dict:
    """A stacker's state with ``importance_``: run folders written before stackers stored it get
    it from the fuser rebuilt through its plugin (``member_importance``), when that plugin is
    installed; otherwise the state as it is."""
    state = info.get("state") or {}
    inner = state.get("fuser_") if isinstance(state.get("fuser_"), dict) else state
    if "importance_" in inner or not isinstance(inner.get("final_estimator_"), dict):
        return state
    try:
        from .plugins import get_plugins

        record = get_plugins().catalog().get("fuser", info["fuser"]).record
        fuser = record.cls(**record.params.model_validate(info.get("params") or {}).model_dump()).set_state(inner)
        importance = fuser.member_importance()
    except Exception:  # a plugin gone or changed since: show what the folder holds
        return state
    if importance is None:
        return state
    return {**state, "fuser_": {**inner, "importance_": importance}} if inner is not state else \
        {**state, "importance_": importance}


def _state_summary(state: dict, members: list[str]) -> str:
    """What a fitted fuser learned, for a person: weights, a meta-learner's importance per member,
    temperature, and any other learned value (the member and class counts left out)."""
    html = ""
    state = from_jsonable(state)
    for key, label, note in (("weights_", "weight", ""),
                             ("importance_", "importance", "<p>Each member's share of the meta-learner's feature "
                                                           "importance (see the fuser's documentation):</p>")):
        values = state.get(key)
        if values is not None and np.ndim(values) == 1 and len(values) == len(members):
            html += note + _share_table(label, members, np.asarray(values, dtype=float))
    if _finite(state.get("temperature_")):
        html += (f"<p>Fitted temperature T = {state['temperature_']:.3f} (fitted on out-of-fold val probabilities; "
                 "T &gt; 1 softens the probabilities, T &lt; 1 sharpens them).</p>")
    inner = state.get("fuser_")
    if isinstance(inner, dict):
        seen = {"weights_"} if "weights_" in state else set()
        html += _state_summary({k: v for k, v in inner.items() if k not in seen}, members)
    shown = {"weights_", "importance_", "temperature_", "final_estimator_", "fuser_", *_BOOKKEEPING}
    other = [[k, _short_value(v)] for k, v in state.items() if k not in shown]
    if other:
        html += "<p class='note'>Other learned state:</p>" + _table(["name", "value"], other)
    return html


def _share_table(label: str, members: list[str], values: np.ndarray) -> str:
    top = float(np.max(np.abs(values))) if len(values) else 0.0
    body = []
    for m, v in zip(members, values):
        width = 0 if top == 0 else int(round(120 * abs(v) / top))
        body.append([m, f"{v:.3f}", f"<span class='bar' style='width:{width}px'></span>"])
    return _table(["member", label, ""], body, numeric={1}, raw={2})


def _short_value(value: Any) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= 12:
            return np.array2string(value, precision=4, separator=", ")
        return f"array of shape {value.shape}"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 200 else text[:200] + "…"


def _run_info(run: RunFolder) -> str:
    rec = run.summary
    rows = [[k, str(rec[k])] for k in ("run_id", "experiment", "status", "started", "seconds", "device", "spec_file") if k in rec]
    fingerprint = rec.get("data", {}).get("fingerprint")
    if fingerprint:
        rows.append(["data fingerprint", str(fingerprint)])
    for pkg, ver in rec.get("versions", {}).items():
        rows.append([pkg, str(ver)])
    return _table(None, rows) if rows else ""
