"""What the model zoo saves: a spec run twice, and once more with one fuser added.

The first run trains and predicts every member; the second, of the unchanged spec, finds them
all in the zoo and only refits the fusers and rewrites the leaderboard and report; the third adds
one fuser to the spec, which is what trying an idea costs. Each is a fresh ``fusion-engine run``
process against a fresh registry, timed from the outside.

    python benchmarks/bench_repeat.py [--spec experiments/quickstart.yaml] [--json out.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Report, parser

ROOT = Path(__file__).resolve().parent.parent


def run(spec: Path, registry: Path) -> tuple[float, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fusion_engine", "run", str(spec), "--registry", str(registry), "--quiet"],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    return seconds, json.loads((run_dir / "run.json").read_text(encoding="utf-8"))


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, default=ROOT / "experiments" / "quickstart.yaml")
    args = p.parse_args()
    report = Report("repeat", args)
    spec = args.spec.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        first, rec1 = run(spec, registry)
        report.add("first run", f"{first:7.2f} s  trained {rec1['trained']}", seconds=first, trained=rec1["trained"])
        repeats = []
        for _ in range(max(1, args.repeats // 2)):
            seconds, rec2 = run(spec, registry)
            repeats.append(seconds)
        second = sorted(repeats)[len(repeats) // 2]
        ratio = first / second
        report.add("repeated run, unchanged spec", f"{second:7.2f} s  trained {rec2['trained']}, "
                   f"reused {rec2['reused']}  ({ratio:.1f}x faster)", seconds=second, ratio=ratio,
                   trained=rec2["trained"], reused=rec2["reused"])
        report.check("repeat run", ratio >= 20 and not rec2["trained"], f">= 20x faster than the first (got {ratio:.1f}x)")

        more = Path(tmp) / spec.name
        more.write_text(spec.read_text(encoding="utf-8").rstrip("\n")
                        + "\n  - {name: one-more, fuser: logistic-stacking, params: {C: 0.1}}\n", encoding="utf-8")
        try:
            third, rec3 = run(more, registry)
        except subprocess.CalledProcessError as exc:  # a spec whose fusers list is not last
            report.add("one more fuser", f"skipped: {exc.stderr.strip().splitlines()[-1:]}")
        else:
            report.add("the same members, one more fuser", f"{third:7.2f} s  trained {rec3['trained']}",
                       seconds=third, trained=rec3["trained"])
    report.finish()


if __name__ == "__main__":
    main()
