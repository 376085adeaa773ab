"""Start-up time of the commands a user types most: ``--help``, ``validate`` and ``plugins``.

Each runs as a fresh process (what a user waits for), against a bare ``python -c pass`` as the
baseline; none of them may import torch or timm. ``--help`` and ``plugins`` should stay under a
second. ``validate`` of the quickstart checks its data before a run would (issue 12): it loads
scikit-learn's digits and makes the stratified split with scikit-learn, so its second baseline is
``python -c "import sklearn.datasets, sklearn.model_selection"``, and the goal is the engine's own
cost above that import: under a second. Fastest of ``--repeats`` runs each, interleaved.

    python benchmarks/bench_cli.py [--json out.json]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _common import Report, best, parser, side_by_side

ROOT = Path(__file__).resolve().parent.parent
SKLEARN = "python -c 'import sklearn.datasets, sklearn.model_selection'"
VALIDATE = "fusion-engine validate quickstart.yaml"


def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    report = Report("cli", args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "fusion_engine"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        SKLEARN: [sys.executable, "-c", "import sklearn.datasets, sklearn.model_selection"],
        "fusion-engine --help": [*cli, "--help"],
        VALIDATE: [*cli, "validate", str(ROOT / "experiments" / "quickstart.yaml")],
        "fusion-engine plugins": [*cli, "plugins"],
    }

    def call(argv: list[str]):
        return lambda: subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)

    times = side_by_side({name: call(argv) for name, argv in commands.items()}, args.repeats)
    baseline = best(times["python -c pass"])
    for name, values in times.items():
        seconds = best(values)
        report.add(name, f"{seconds:6.3f} s  ({seconds / baseline:4.1f}x python start-up)",
                   command=name, seconds=seconds, ratio_to_python=seconds / baseline)
        if name == VALIDATE:
            above = seconds - best(times[SKLEARN])
            report.add("validate above the scikit-learn import", f"{above:6.3f} s", seconds=above)
            report.check(name, above < 1.0, f"under 1 s above importing scikit-learn (got {above:.3f} s)")
        elif name not in ("python -c pass", SKLEARN):
            report.check(name, seconds < 1.0, f"under 1 s (got {seconds:.3f} s)")
    probe = subprocess.run([*cli[:1], "-c", "import sys, fusion_engine.cli as c\n"
                            "try:\n    c.main(['validate', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
                            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))",
                            str(ROOT / "experiments" / "quickstart.yaml")],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    imported = probe.stdout.strip().splitlines()[-1:] != ["[]"]
    report.add("validate imports torch or timm", str(imported), torch_imported=imported)
    report.check("validate without torch", not imported, "validate imports neither torch nor timm")
    report.finish()


if __name__ == "__main__":
    main()
