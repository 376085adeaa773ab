"""Drawing a run's plots in one process against in forked worker processes.

Drawing the plots (a confusion matrix per leaderboard row, reliability, Pareto, training curves)
is most of what a repeated run spends that is not importing libraries. ``write_plots`` forks up to
one worker per core when neither torch nor Ray is loaded (a repeated run loads neither). This
script makes the quickstart's run folder once (its members trained for one epoch at 8 px: the
plots' cost does not depend on how good the members are), then draws its plots with one process
and with the default, side by side, fastest of ``--repeats``. It imports no torch itself.

    python benchmarks/bench_plots.py [--json out.json]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _common import Report, best, parser, side_by_side

ROOT = Path(__file__).resolve().parent.parent


def quickstart_run(tmp: Path) -> Path:
    """The quickstart spec's run folder, its members trained for one epoch on 8 px digits."""
    spec = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text(encoding="utf-8"))
    spec["data"]["image_size"] = 8
    for member in spec["members"]:
        member.setdefault("train", {})["epochs"] = 1
    path = tmp / "quickstart-8px.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "fusion_engine", "run", str(path), "--registry", str(tmp / "reg"),
                          "--quiet"], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    args = p.parse_args()
    from fusion_engine.plots import _cores, write_plots

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = quickstart_run(Path(tmp))
        assert "torch" not in sys.modules  # as in a repeated run, where write_plots may fork
        n_plots = len(write_plots(run_dir, processes=1))
        workers = min(4, _cores())
        times = side_by_side({"one process": lambda: write_plots(run_dir, processes=1),
                              f"{workers} processes": lambda: write_plots(run_dir)}, repeats=args.repeats)
    one, many = best(times["one process"]), best(times[f"{workers} processes"])
    report = Report("plots", args)  # after the timing: describing the machine imports torch
    report.add(f"{n_plots} plots, one process", f"{one:6.2f} s", seconds=one, plots=n_plots, processes=1)
    report.add(f"{n_plots} plots, {workers} forked processes", f"{many:6.2f} s  ({one / many:.2f}x faster)",
               seconds=many, plots=n_plots, processes=workers, ratio=one / many)
    report.finish()


if __name__ == "__main__":
    main()
