"""Shared fixtures and helpers. Tests make their own data; nothing is downloaded.

- ``TOY_PLUGIN``: the plugin file a user would write (a tiny backbone, a dataset, a fuser);
  ``LIST_TRACKER``: a tracker plugin file that lists the lifecycle events it hears;
- :func:`toy_spec_data` / the ``toy_spec`` fixture: the toy experiment (two members on the toy
  dataset), as data or written to a file, with any top-level field replaced;
- :func:`cli` (a subprocess, as a user runs it) and :func:`cli_json` (in-process, ``--json``);
- ``toy_run``: the toy experiment run once per session; ``toy_registry``: a copy of its registry
  that a test may change, whose members are all stored (a run of the toy spec trains nothing);
- ``make_image_folder``: tiny image folders.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

TESTS = Path(__file__).parent
REPO = TESTS.parent
TOY_PLUGIN = TESTS / "plugins" / "toy_plugin.py"
LIST_TRACKER = TESTS / "plugins" / "list_tracker.py"  # a tracker that lists the events it hears
EXPERIMENTS = REPO / "experiments"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

#: the toy experiment: two small members trained for two epochs, and two fusers
TOY = {
    "name": "toy",
    "seed": 3,
    "device": "cpu",
    "plugins": [str(TOY_PLUGIN)],
    "data": {"dataset": "toy-data", "params": {"n_per_class": 20}, "split": {"val": 0.25, "test": 0.25}},
    "members": [
        {"name": "net-a", "backbone": "toy-net", "train": {"epochs": 2, "batch_size": 16}},
        {"name": "net-b", "backbone": "toy-net", "params": {"width": 6}, "seed": 7,
         "train": {"epochs": 2, "batch_size": 16, "optimizer": "sgd"}},
    ],
    "fusers": [{"name": "avg", "fuser": "toy-mean"}, {"name": "avg-a", "fuser": "toy-mean", "members": ["net-a"]}],
}


def toy_spec_data(**fields) -> dict:
    """The toy spec with top-level ``fields`` replaced (``members=[...]``, ``data={...}``)."""
    return {**copy.deepcopy(TOY), **copy.deepcopy(fields)}


def write_spec(path: Path, spec: dict | str) -> Path:
    """``spec`` (data, or YAML text) written to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def toy_spec(tmp_path):
    """``toy_spec(**fields)`` writes the toy spec, fields replaced, to ``tmp_path/spec.yaml``
    (``filename=`` and ``folder=`` choose another place) and returns its path."""

    def make(*, filename: str = "spec.yaml", folder: Path | None = None, **fields) -> Path:
        return write_spec((folder or tmp_path) / filename, toy_spec_data(**fields))

    return make


def cli(*args, env: dict | None = None, cwd: Path | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """``python -m fusion_engine ARGS`` in a fresh process, as a user runs it: ``env`` adds to
    (or replaces) this process's environment variables; past ``timeout`` seconds the process is
    killed and :class:`subprocess.TimeoutExpired` fails the test."""
    return subprocess.run([sys.executable, "-m", "fusion_engine", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def cli_json(capsys, *args) -> object:
    """``fusion-engine ARGS --json`` in this process; its output, parsed (exit status 0 asserted)."""
    from fusion_engine.cli import main

    capsys.readouterr()
    assert main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def summary(run_dir: Path) -> dict:
    """A run's ``run.json``."""
    return json.loads((Path(run_dir) / "run.json").read_text())


def loaded(plugin: Path):
    """The module a spec's plugin file was last loaded as."""
    return next(m for n, m in sys.modules.items()
                if n.startswith("fusion_engine_local_") and Path(getattr(m, "__file__", "")) == Path(plugin).resolve())


def run_list_tracker(tmp_path: Path, registry: Path, tracking: dict | None = None):
    """The toy spec with the list tracker (``LIST_TRACKER``) and ``tracking:`` (left out when
    ``None``), run on ``registry``: its run folder and the events the tracker heard."""
    from fusion_engine.runner import run_experiment

    fields = {} if tracking is None else {"tracking": tracking}
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(name="tracked", plugins=[str(TOY_PLUGIN), str(LIST_TRACKER)],
                                                            **fields))
    result = run_experiment(spec, registry=registry, quiet=True)
    return result.run_dir, loaded(LIST_TRACKER).EVENTS


def latest_run(registry: Path) -> Path:
    return max((registry / "runs").iterdir(), key=lambda p: p.stat().st_mtime_ns)


@dataclass
class ToyRun:
    spec: Path
    registry: Path
    run_dir: Path
    summary: dict

    @property
    def keys(self) -> dict[str, str]:
        return {name: m["key"] for name, m in self.summary["members"].items()}


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> ToyRun:
    """The toy spec, run once for the session in this process. Read it; copy before changing it."""
    from fusion_engine.runner import run_experiment

    root = tmp_path_factory.mktemp("toy")
    spec = write_spec(root / "spec.yaml", toy_spec_data())
    result = run_experiment(spec, registry=root / "registry", quiet=True)
    return ToyRun(spec, root / "registry", result.run_dir, summary(result.run_dir))


@pytest.fixture
def toy_registry(toy_run, tmp_path) -> Path:
    """A copy of the toy run's registry, every toy member stored, for a test to change."""
    return Path(shutil.copytree(toy_run.registry, tmp_path / "registry", ignore=shutil.ignore_patterns("locks")))


def square_colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    """A colour unique to each (class, image) pair in a small folder, so every file differs."""
    return ((40 * class_index + 7 * image_index) % 256, (90 + 13 * image_index) % 256, (200 - 30 * class_index) % 256)


@pytest.fixture
def make_image_folder(tmp_path):
    """A factory for tiny image folders of solid-coloured squares.

    ``make_image_folder()`` gives ``root/<class>/<class>-<i>.png``; with ``splits=("train",
    "val", "test")`` it gives ``root/<split>/<class>/...``. ``suffix=".jpg"`` writes JPEG files
    (any other suffix, PNG); ``noise=True`` adds seeded pixel noise to each square, so resizing
    and JPEG decoding have detail to work on. Calling it again with the same ``name`` and another
    suffix adds files beside the first ones. Returns ``root``.
    """

    def make(
        name: str = "images",
        classes: tuple[str, ...] = ("cat", "dog", "fox"),
        per_class: int = 4,
        size: int = 16,
        splits: tuple[str, ...] | None = None,
        suffix: str = ".png",
        noise: bool = False,
    ) -> Path:
        import numpy as np

        root = tmp_path / name
        fmt = "JPEG" if suffix.lower() in (".jpg", ".jpeg") else "PNG"
        for part in splits or (None,):
            for c, class_name in enumerate(classes):
                folder = root / part / class_name if part else root / class_name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    image = Image.new("RGB", (size, size), square_colour(c, i))
                    if noise:
                        rng = np.random.default_rng([c, i])
                        pixels = np.asarray(image, np.int16) + rng.integers(-60, 61, (size, size, 3))
                        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                    image.save(folder / f"{class_name}-{i}{suffix}", format=fmt)
        return root

    return make
