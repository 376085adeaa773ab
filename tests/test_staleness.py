"""The zoo never serves a member made by other code or other files: a plugin package's new
version, a plugin file's new text, or a weights file's new bytes is a new member; moving a file
is not. ``run --retrain`` trains members again on request."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TOY_PLUGIN, summary, toy_spec_data, write_spec
from fusion_engine.cli import main
from fusion_engine.runner import run_experiment
from fusion_engine.zoo import Registry

BACKBONE_PACKAGE = """
    from pydantic import Field

    from fusion_engine import BackboneRecord, BuiltBackbone, InputConfig, Params, hookimpl

    KERNEL = {kernel}


    class NetParams(Params):
        width: int = Field(4, gt=0)


    def build(params, num_classes, image_size=None):
        import torch.nn as nn

        module = nn.Sequential(nn.Conv2d(1, params.width, KERNEL, padding=KERNEL // 2), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(params.width, num_classes))
        return BuiltBackbone(module, InputConfig(size=image_size or 8, mean=(0.5,), std=(0.5,), in_chans=1))


    @hookimpl
    def register_backbones():
        return [BackboneRecord("pkg-net", build, NetParams)]
"""


def run(spec: Path, registry: Path, **kwargs) -> dict:
    return summary(run_experiment(spec, registry=registry, quiet=True, **kwargs).run_dir)


def one_member(path: Path, member: dict, plugins: list[str]) -> Path:
    return write_spec(path, toy_spec_data(plugins=plugins, members=[{"name": "m", **member, "train": {
        "epochs": 1, "batch_size": 16}}], fusers=[{"name": "avg", "fuser": "toy-mean"}]))


def install(site: Path, version: str, kernel: int) -> None:
    """The distribution ``pkg-net-plugin`` at ``version``, as pip leaves it."""
    for old in site.glob("pkg_net_plugin-*.dist-info"):
        shutil.rmtree(old)
    (site / "fe_pkg_net.py").write_text(textwrap.dedent(BACKBONE_PACKAGE.format(kernel=kernel)))
    info = site / f"pkg_net_plugin-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pkg-net-plugin\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[fusion_engine]\npkg-net-plugin = fe_pkg_net\n")
    sys.modules.pop("fe_pkg_net", None)
    importlib.invalidate_caches()


def test_a_new_version_of_the_plugin_package_is_a_new_member(tmp_path, monkeypatch):
    """The reported case: kernel 3 -> 5 and version 0.1.0 -> 0.2.0 was served from the zoo."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    install(site, "0.1.0", kernel=3)
    spec = one_member(tmp_path / "spec.yaml", {"backbone": "pkg-net"}, [str(TOY_PLUGIN)])
    first = run(spec, tmp_path / "reg")
    assert first["trained"] == ["m"] and run(spec, tmp_path / "reg")["reused"] == ["m"]
    install(site, "0.2.0", kernel=5)
    second = run(spec, tmp_path / "reg")
    assert second["trained"] == ["m"] and second["members"]["m"]["key"] != first["members"]["m"]["key"]
    with Registry(tmp_path / "reg") as reg:
        code = reg.verify(reg.get(second["members"]["m"]["key"])).key_material["code"]
    assert code["plugin"] == {"distribution": "pkg-net-plugin", "version": "0.2.0"}
    assert set(code) == {"engine", "plugin", "torch", "timm"} and code["torch"].count(".") == 1
    sys.modules.pop("fe_pkg_net", None)


def test_an_edited_plugin_file_is_a_new_member(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    shutil.copy(TOY_PLUGIN, plugin)
    spec = one_member(tmp_path / "spec.yaml", {"backbone": "toy-net"}, ["my_plugin.py"])
    first = run(spec, tmp_path / "reg")
    assert run(spec, tmp_path / "reg")["reused"] == ["m"]
    plugin.write_text(plugin.read_text() + "\n# a comment is a change of code too\n")
    second = run(spec, tmp_path / "reg")
    assert second["trained"] == ["m"] and second["members"]["m"]["key"] != first["members"]["m"]["key"]


def test_a_weights_file_is_known_by_its_bytes_not_its_path(tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "a" / "marker.safetensors"
    weights.parent.mkdir()
    save_file({"marker": torch.arange(5.0)}, str(weights))
    spec = one_member(tmp_path / "spec.yaml", {"backbone": "file-net", "params": {"weights": str(weights)}},
                      [str(TOY_PLUGIN)])
    first = run(spec, tmp_path / "reg")
    moved = tmp_path / "b" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.move(weights, moved)
    spec = one_member(spec, {"backbone": "file-net", "params": {"weights": str(moved)}}, [str(TOY_PLUGIN)])
    assert run(spec, tmp_path / "reg")["reused"] == ["m"]  # the same bytes elsewhere: the same member
    save_file({"marker": torch.arange(6.0)}, str(moved))
    third = run(spec, tmp_path / "reg")
    assert third["trained"] == ["m"] and third["members"]["m"]["key"] != first["members"]["m"]["key"]


def test_retrain_trains_the_named_members_again_and_replaces_them(toy_run, toy_registry, capsys):
    keys = toy_run.keys
    with Registry(toy_registry) as reg:
        created = {name: reg.get(key).created for name, key in keys.items()}
    assert main(["run", str(toy_run.spec), "--registry", str(toy_registry), "--quiet", "--retrain", "net-a"]) == 0
    record = summary(capsys.readouterr().out.strip())
    assert (record["trained"], record["reused"]) == (["net-a"], ["net-b"])
    with Registry(toy_registry) as reg:
        assert [e.key for e in reg.entries()].count(keys["net-a"]) == 1  # replaced, not added
        assert reg.get(keys["net-a"]).created > created["net-a"] and reg.get(keys["net-b"]).created == created["net-b"]
        reg.verify(reg.get(keys["net-a"]))
    board = json.loads((Path(record["registry"]) / "runs" / record["run_id"] / "leaderboard.json").read_text())
    before = json.loads((toy_run.run_dir / "leaderboard.json").read_text())
    assert [r["accuracy"] for r in board["rows"]] == [r["accuracy"] for r in before["rows"]]  # CPU: the same again

    assert main(["run", str(toy_run.spec), "--registry", str(toy_registry), "--quiet", "--retrain", "all"]) == 0
    assert summary(capsys.readouterr().out.strip())["trained"] == ["net-a", "net-b"]


@pytest.mark.parametrize("retrain", [["net-a,net-b"], ["net-a", "net-b"]])
def test_retrain_takes_several_names(toy_run, toy_registry, capsys, retrain):
    args = [a for name in retrain for a in ("--retrain", name)]
    assert main(["run", str(toy_run.spec), "--registry", str(toy_registry), "--quiet", *args]) == 0
    assert summary(capsys.readouterr().out.strip())["trained"] == ["net-a", "net-b"]
