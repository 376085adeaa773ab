"""The plugin author's guide, as a user follows it: pip-install the example package, use it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import cli

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "fusion-engine-example"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True)
    return target


def test_installed_package_is_listed(site):
    out = cli("plugins", "--json", env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    example = rows["fusion-engine-example"]
    assert example["version"] == "0.1.0" and not example["first_party"]
    assert example["backbones"] == ["tiny-cnn"] and example["fusers"] == ["median"]
    assert example["hooks"] == ["register_backbones", "register_fusers"]


def test_installed_package_runs_in_a_spec(site, tmp_path):
    spec = tmp_path / "my.yaml"
    spec.write_text(
        "name: my-tiny\n"
        "device: cpu\n"
        "data: {dataset: sklearn-digits, params: {n_per_class: 12}, image_size: 8}\n"
        "members:\n"
        "  - {name: tiny, backbone: tiny-cnn, params: {width: 8}, train: {epochs: 1}}\n"
        "  - {name: tiny2, backbone: tiny-cnn, params: {width: 4}, seed: 1, train: {epochs: 1}}\n"
        "fusers:\n"
        "  - {name: median, fuser: median}\n"
    )
    out = cli("run", spec, "--registry", tmp_path / "reg", "--quiet", env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    board = pd.read_csv(Path(out.stdout.strip()) / "leaderboard.csv")
    assert sorted(board["name"]) == ["median", "tiny", "tiny2"]
    assert board.set_index("name").loc["median", "kind"] == "fuser"


def test_bad_params_for_a_third_party_backbone(site, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\ndata: {dataset: sklearn-digits}\nmembers:\n  - {name: t, backbone: tiny-cnn, params: {width: 0}}\n")
    out = cli("validate", spec, env={"PYTHONPATH": str(site)})
    assert out.returncode == 2
    assert out.stderr == (f"{spec}: members.0.params.width: Input should be greater than or equal to 1 (got 0); allowed: "
                          "an integer from 1 to 512\n")
