"""Plots and report, rendered from a synthetic run folder that holds exactly what the runner writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from safetensors.numpy import save_file
from scipy.special import softmax
from simulate import simulate_members

from fusion_engine import FusionEngineError, TemperatureScaled
from fusion_engine.leaderboard import Row, build_leaderboard
from fusion_engine.plugins import get_plugins
from fusion_engine.plots import write_plots
from fusion_engine.report import write_report
from fusion_engine.runfolder import RunFolder
from fusion_engine_fusers import LogisticStacking, Mean, Weighted

# user text that must come out escaped: a class name is whatever a folder was called
CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", '<i>nine</i> & "9"']
MEMBERS = {"resnet18": 0.8, "mobilenetv2": 0.72, "tiny-cnn": 0.6}


def make_run(root: Path, *, n_val: int = 150, n_test: int = 150, seed: int = 0) -> Path:
    """A run folder as ``fusion-engine run`` leaves it, from simulated member logits."""
    run_id = "20260101-120000-synthetic-ab12"
    run_dir = root / "runs" / run_id
    (run_dir / "fusers").mkdir(parents=True)
    n_train = 300
    logits, labels = simulate_members(list(MEMBERS.values()), n_samples=n_val + n_test, n_classes=len(CLASSES),
                                      seed=seed, margin=2.0)
    y = {"val": labels[:n_val], "test": labels[n_val:]}
    member_logits = {name: {"val": logits[i, :n_val], "test": logits[i, n_val:]} for i, name in enumerate(MEMBERS)}
    ids = {s: [f"{s}-{i:04d}" for i in range(n)] for s, n in (("train", n_train), ("val", n_val), ("test", n_test))}

    spec = {"name": "synthetic", "seed": 0, "device": "cpu", "plugins": [],
            "data": {"dataset": "imagefolder", "params": {"root": "/data/<weird> & path"}, "image_size": 32,
                     "split": {"val": 0.25, "test": 0.25}},
            "members": [{"name": n, "backbone": "timm", "params": {"model": n}} for n in MEMBERS],
            "fusers": [{"name": "mean", "fuser": "mean"}, {"name": "weighted", "fuser": "weighted", "temperature": True},
                       {"name": "stack-lr", "fuser": "logistic-stacking"}]}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    (run_dir / "run.json").write_text(json.dumps({
        "run_id": run_id, "experiment": "synthetic", "status": "complete", "started": "2026-01-01T12:00:00+00:00",
        "seconds": 42.0, "device": "cpu", "versions": {"python": "3.11", "fusion-engine": "0.1.0"},
        "data": {"split_sizes": sizes, "classes": CLASSES, "fingerprint": "abc123"}}))
    rng = np.random.default_rng(seed)
    split = {"classes": CLASSES, "train": {"ids": ids["train"], "labels": rng.integers(0, 10, n_train).tolist()},
             **{s: {"ids": ids[s], "labels": y[s].tolist()} for s in ("val", "test")}}
    (run_dir / "split.json").write_text(json.dumps(split))

    rows = []
    for i, (name, logit) in enumerate(member_logits.items()):
        out = run_dir / "members" / name
        out.mkdir(parents=True)
        history = [{"epoch": e, "train_loss": 2.0 / e + 0.1 * i, "val_loss": 1.8 / e + 0.2 + 0.02 * e,
                    "val_accuracy": min(0.95, 0.4 + 0.1 * e - 0.05 * i), "lr": 1e-3, "seconds": 1.0} for e in range(1, 7)]
        card = {"name": name, "backbone": "timm", "plugin": "fusion_engine_timm", "params": {"model": name},
                "history": history, "best_epoch": 4, "n_params": 1_000_000 * (3 - i), "train_seconds": 30.0 - 8 * i,
                "predict_seconds": 0.3 - 0.08 * i, "val_accuracy": float(np.mean(logit["val"].argmax(1) == y["val"])),
                "temperature": None}
        (out / "card.json").write_text(json.dumps(card))
        rows.append(Row(name, "member", [name], {s: softmax(logit[s], axis=1) for s in ("val", "test")},
                        extra={"n_params": card["n_params"], "train_seconds": card["train_seconds"],
                               "infer_ms_per_image": 1000 * card["predict_seconds"] / (n_val + n_test)}))

    stacked = {s: np.stack([member_logits[n][s] for n in MEMBERS]) for s in ("val", "test")}
    fusers = {"mean": Mean(), "weighted": TemperatureScaled(Weighted(), seed=0), "stack-lr": LogisticStacking()}
    for fspec, (name, fuser) in zip(spec["fusers"], fusers.items()):
        fuser.fit(stacked["val"], y["val"])
        (run_dir / "fusers" / f"{name}.json").write_text(json.dumps({
            "name": name, "fuser": fspec["fuser"], "plugin": "fusion_engine_fusers", "members": list(MEMBERS),
            "params": {}, "temperature": bool(fspec.get("temperature")), "state": fuser.get_state()}))
        weights = getattr(fuser, "weights_", None)
        rows.append(Row(name, "fuser", list(MEMBERS), {s: fuser.predict_proba(stacked[s]) for s in ("val", "test")},
                        weights=None if weights is None else [float(w) for w in weights],
                        extra={"fit_seconds": 0.05, "predict_ms_per_image": 0.002}))

    metrics = [p.record for p in get_plugins().catalog().records["metric"].values()]
    board = build_leaderboard(rows, y, metrics, n_bootstrap=200, seed=0)
    RunFolder(run_dir).write_leaderboard(board, meta={"run_id": run_id, "experiment": "synthetic", "scored_on": "test",
                                                      "split_sizes": sizes})
    save_file({f"{r.name}/{s}": np.ascontiguousarray(r.proba[s]) for r in rows for s in ("val", "test")},
              str(run_dir / "probabilities.safetensors"))
    for s in ("val", "test"):
        df = pd.DataFrame({"id": ids[s], "label": y[s]})
        for r in rows:
            df[r.name] = r.proba[s].argmax(1)
        df.to_csv(run_dir / f"predictions_{s}.csv", index=False)
    return run_dir


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("registry"))


@pytest.fixture
def fresh_run(synthetic_run, tmp_path) -> Path:
    """A copy of the synthetic run folder that a test may change."""
    return Path(shutil.copytree(synthetic_run, tmp_path / synthetic_run.name))


@pytest.fixture(scope="module")
def rendered(synthetic_run):
    plots = write_plots(synthetic_run)
    report = write_report(synthetic_run, plots)
    return synthetic_run, plots, report


ROWS = [*MEMBERS, "mean", "weighted", "stack-lr"]


def test_write_plots_draws_every_picture(rendered):
    run_dir, plots, _ = rendered
    names = sorted(p.path.name for p in plots)
    assert names == sorted([f"confusion_{r}.png" for r in ROWS] + ["pareto.png", "reliability.png", "training_curves.png"])
    assert sorted((p.kind, p.row) for p in plots if p.kind == "confusion") == sorted(("confusion", r) for r in ROWS)
    assert sorted(p.kind for p in plots if p.kind != "confusion") == ["pareto", "reliability", "training"]
    for plot in plots:
        assert plot.path.parent == run_dir / "plots"
        with Image.open(plot.path) as image:
            assert image.format == "PNG" and min(image.size) >= 200


def test_plots_skip_what_the_folder_cannot_support(fresh_run):
    run_dir = fresh_run
    shutil.rmtree(run_dir / "plots", ignore_errors=True)
    board = json.loads((run_dir / "leaderboard.json").read_text())
    for row in board["rows"]:
        row["infer_ms_per_image"] = None  # a leaderboard written before the cost columns
    (run_dir / "leaderboard.json").write_text(json.dumps(board))
    for card in (run_dir / "members").glob("*/card.json"):
        card.write_text(json.dumps({**json.loads(card.read_text()), "history": []}))
    names = {p.path.name for p in write_plots(run_dir)}
    assert "pareto.png" not in names and "training_curves.png" not in names
    assert "reliability.png" in names and len(names) == len(ROWS) + 1


def test_report_holds_every_row_every_plot_and_the_fusers(rendered):
    run_dir, plots, report = rendered
    html = report.read_text(encoding="utf-8")
    assert report == run_dir / "report.html"
    board = pd.read_csv(run_dir / "leaderboard.csv")
    for name in board["name"]:
        assert re.search(rf"<td>{re.escape(name)}</td>", html), name
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", html)
    assert sorted(alt for alt, _ in images) == sorted(p.path.name for p in plots)
    # the leaderboard with intervals, the split sizes, the weights and the meta-learner
    acc = board.set_index("name").loc["stack-lr"]
    assert f"{acc['accuracy']:.4f} [{acc['accuracy_lo']:.4f}, {acc['accuracy_hi']:.4f}]" in html
    assert "<td>test</td><td class='num'>150</td>" in html
    assert "Fitted temperature" in html and "share of the meta-learner's feature importance" in html
    assert html.count("<span class='bar'") >= 2 * len(MEMBERS)
    assert "name: synthetic" in html  # the spec


def test_report_is_self_contained_valid_and_escaped(rendered):
    _, _, report = rendered
    html = report.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    for attr, value in re.findall(r"""\b(src|href)\s*=\s*['"]([^'"]*)['"]""", html):
        assert value.startswith(("data:image/png;base64,", "#")), (attr, value[:60])
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    assert '<i>nine</i>' not in html and "&lt;i&gt;nine&lt;/i&gt; &amp; &quot;9&quot;" in html
    assert "/data/&lt;weird&gt; &amp; path" in html
    check_balanced(html)


VOID = {"meta", "img", "br", "hr", "input", "link", "col", "area", "base", "wbr", "source"}


def check_balanced(html: str) -> None:
    """Every element closes, in order: a strict reading of well-formed HTML."""

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.stack: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag not in VOID:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
            self.stack.pop()

    checker = Checker()
    checker.feed(html)
    checker.close()
    assert checker.stack == [], checker.stack


def test_report_rerenders_from_the_folder_alone(fresh_run):
    run_dir = fresh_run
    shutil.rmtree(run_dir / "plots", ignore_errors=True)
    (run_dir / "report.html").unlink(missing_ok=True)
    report = write_report(run_dir, write_plots(run_dir))
    assert (run_dir / "plots" / "reliability.png").is_file()
    assert report.read_text(encoding="utf-8").count("data:image/png;base64,") == len(ROWS) + 3


def test_a_folder_without_a_leaderboard_is_a_clear_error(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(FusionEngineError, match=r"no leaderboard.json, so nothing to report \(its status is 'failed'"):
        write_report(tmp_path, [])


def test_run_folder_reads_what_the_runner_wrote(rendered):
    run = RunFolder(rendered[0])
    assert run.classes == CLASSES and run.split_sizes == {"train": 300, "val": 150, "test": 150}
    assert list(run.cards) == list(MEMBERS) and list(run.fusers) == ["mean", "weighted", "stack-lr"]
    assert sorted(run.probabilities("test")) == sorted(ROWS)
    assert run.leaderboard["best_member"] == "resnet18"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Read by the headless check: every image decoded, and the document's text, then into the DOM
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = 'PROBE images=' + imgs.length + ' broken=' + JSON.stringify(bad);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_opens_in_headless_chromium(rendered, tmp_path):
    """Chromium loads the report from disk, offline, and decodes every embedded image.

    A copy of the report gets a probe script (the report itself has none) that writes into
    the DOM how many images loaded; ``--dump-dom`` prints the DOM after the load event.
    """
    _, plots, report = rendered
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
               "--dump-dom", probed.as_uri()]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"PROBE images={len(plots)} broken=[]" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
    for name in ROWS:
        assert f"<td>{name}</td>" in out.stdout


def test_fuser_summaries_explain_an_xgboost_stacker_and_a_temperature():
    from fusion_engine.report import _state_summary
    from fusion_engine_fusers import XGBoostStacking

    logits, y = simulate_members([0.9, 0.6], n_samples=200, n_classes=4, seed=1)
    fuser = TemperatureScaled(XGBoostStacking(n_estimators=5, n_jobs=1), cv=3, seed=0).fit(logits, y)
    state = json.loads(json.dumps(fuser.get_state()))  # as read back from fusers/<name>.json
    html = _state_summary(state, ["strong", "weak"])
    assert "share of the meta-learner's feature importance" in html
    assert "Fitted temperature T = " in html
    shares = [float(v) for v in re.findall(r"<td class='num'>([0-9.]+)</td>", html)]
    assert len(shares) == 2 and sum(shares) == pytest.approx(1.0, abs=0.002)
    assert shares[0] > shares[1]  # the trees split more on the stronger member's features


def test_pareto_labels_of_rows_at_one_point_are_stacked_and_placing_them_ends():
    """Two members at the same cost and accuracy: (b + line) - b rounds to just under line here,
    which once pushed the second label up forever and hung the run."""
    from fusion_engine.plots import _place_labels

    px_per_pt = 100 / 72  # the plots' dpi, 8 pt labels: the sizes _label_points passes
    line, char, gap = 1.3 * 8 * px_per_pt, 0.6 * 8 * px_per_pt, 6 * px_per_pt
    points = np.array([[156.67647058823525, 239.19999999999973]] * 2 + [[599.3235294117646, 239.19999999999973]])
    placed = _place_labels(points, ["flaky", "steady", "avg"], line, char, gap)
    bottoms = sorted(placed[i][2] for i in (0, 1))
    assert bottoms[1] - bottoms[0] == pytest.approx(line)
    assert placed[2][2] == pytest.approx(points[2][1] + gap / 3)
