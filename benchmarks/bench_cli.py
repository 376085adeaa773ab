"""Start-up time of the commands a user types most: ``--help``, ``validate`` and ``plugins``.

Each runs as a fresh process (what a user waits for), against a bare ``python -c pass`` as the
baseline; none of them may import torch, so each should stay well under a second. Fastest of
``--repeats`` runs each, interleaved.

    python benchmarks/bench_cli.py [--json out.json]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _common import Report, best, parser, side_by_side

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    report = Report("cli", args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "fusion_engine"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "fusion-engine --help": [*cli, "--help"],
        "fusion-engine validate quickstart.yaml": [*cli, "validate", str(ROOT / "experiments" / "quickstart.yaml")],
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
        if name != "python -c pass":
            report.check(name, seconds < 1.0, f"under 1 s (got {seconds:.3f} s)")
    probe = subprocess.run([*cli[:1], "-c", "import sys, fusion_engine.cli as c\n"
                            "try:\n    c.main(['validate', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
                            "print('torch' in sys.modules)", str(ROOT / "experiments" / "quickstart.yaml")],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    imported = probe.stdout.strip().splitlines()[-1:] == ["True"]
    report.add("validate imports torch", str(imported), torch_imported=imported)
    report.check("validate without torch", not imported, "validate does not import torch")
    report.finish()


if __name__ == "__main__":
    main()
