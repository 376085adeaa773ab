"""What every benchmark shares: the machine it ran on, side-by-side timing, and output.

Each script prints one line per figure (the engine, the baseline and their ratio) and, with
``--json PATH``, writes the same figures with the machine's description, so that numbers from
different machines are never compared without knowing it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH ('-' for stdout)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each side")
    return p


def machine() -> dict[str, Any]:
    """The hardware and versions a figure came from."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def side_by_side(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                 sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each candidate, interleaved (A B A B ...) so that a change in the
    machine's load hits every side alike; ``warmup`` untimed rounds first."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def best(values: list[float]) -> float:
    """The fastest repetition, as ``timeit`` reports: on a shared machine the others measure
    the neighbours as well as the code."""
    return min(values)


class Report:
    """Figures as they are measured: printed at once, written as JSON at the end."""

    def __init__(self, benchmark: str, args: argparse.Namespace):
        self.data: dict[str, Any] = {"benchmark": benchmark, "machine": machine(), "figures": []}
        self.args = args
        print(f"# {benchmark} on {self.data['machine']['cpu']} ({self.data['machine']['affinity']} cores usable), "
              f"torch threads {self.data['machine'].get('torch_threads')}", flush=True)

    def add(self, name: str, line: str, **values: Any) -> None:
        self.data["figures"].append({"name": name, **values})
        print(f"{name:<44} {line}", flush=True)

    def check(self, name: str, ok: bool, goal: str) -> None:
        self.data.setdefault("goals", []).append({"name": name, "goal": goal, "met": bool(ok)})
        print(f"{'goal ' + ('met' if ok else 'MISSED'):<12} {name}: {goal}", flush=True)

    def finish(self) -> None:
        if not self.args.json:
            return
        text = json.dumps(self.data, indent=2)
        if self.args.json == "-":
            print(text)
        else:
            Path(self.args.json).write_text(text + "\n", encoding="utf-8")
