"""What tracking a run in MLflow costs: the same repeated run (members from the zoo, fusers
refitted, leaderboard, plots and report rewritten), untracked and tracked, side by side.

Each run is a fresh ``fusion-engine run`` process against one registry whose members the first,
untimed run stored, timed from the outside, so the figures include importing MLflow. Tracking is
switched on by ``MLFLOW_TRACKING_URI`` alone (the spec is unchanged): to a SQLite database
(migrated in the untimed warm-up round), and to a server that is down (a closed port on
127.0.0.1), which is what a tracking failure costs.

    python benchmarks/bench_tracking.py [--spec experiments/quickstart.yaml] [--epochs N] [--repeats 5] [--json out.json]

``--epochs N`` trains each member for N epochs in the untimed first run (the timed runs train
nothing either way), which makes the benchmark quicker on a busy machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import Report, best, median, parser, side_by_side

ROOT = Path(__file__).resolve().parent.parent


def run(spec: Path, registry: Path, tracking_uri: str | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    out = subprocess.run([sys.executable, "-m", "fusion_engine", "run", str(spec), "--registry", str(registry), "--quiet"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"fusion-engine run failed ({tracking_uri or 'untracked'}): {out.stderr.strip()}")
    return json.loads((Path(out.stdout.strip().splitlines()[-1]) / "run.json").read_text(encoding="utf-8"))


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, default=ROOT / "experiments" / "quickstart.yaml")
    p.add_argument("--epochs", type=int, help="train each member this many epochs (default: as the spec says)")
    args = p.parse_args()
    report = Report("tracking", args)
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as closed:
        spec = args.spec.resolve()
        if args.epochs:
            import yaml

            data = yaml.safe_load(spec.read_text(encoding="utf-8"))
            for member in data["members"]:
                member.setdefault("train", {})["epochs"] = args.epochs
            spec = Path(tmp) / spec.name
            spec.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        registry = Path(tmp) / "registry"
        first = run(spec, registry, None)
        report.add("first run (untimed: stores the members)", f"trained {first['trained']}")
        uris = {"untracked": None, "tracked to SQLite": f"sqlite:///{Path(tmp) / 'mlflow' / 'mlflow.db'}",
                "tracked to a server that is down": f"http://127.0.0.1:{closed.getsockname()[1]}"}
        status = {}

        def side(name):
            def call():
                status[name] = run(spec, registry, uris[name]).get("notes", {}).get("mlflow", {}).get("status")
            return call

        times = side_by_side({name: side(name) for name in uris}, args.repeats)
        base = best(times["untracked"])
        for name in uris:
            seconds = best(times[name])
            extra = "" if uris[name] is None else f"  {seconds / base:.2f}x, {seconds - base:+.2f} s; tracking {status[name]}"
            report.add(f"repeated run, {name}", f"{seconds:7.2f} s (median {median(times[name]):.2f} s){extra}",
                       seconds=seconds, median=median(times[name]), ratio=seconds / base, tracking=status[name])
    report.finish()


if __name__ == "__main__":
    main()
