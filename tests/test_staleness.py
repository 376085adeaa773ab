"""The zoo never serves a member made by other code or other files: a plugin package's new
version, a plugin file's new text, or a weights file's new bytes is a new member; moving a file
is not. ``run --retrain`` trains members again on request."""

from __future__ import annotations

import hashlib
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


def install(site: Path, version: str, kernel: int, *, editable: bool = False) -> None:
    """The distribution ``pkg-net-plugin`` at ``version``, as pip leaves it: from a wheel (its
    RECORD lists the module), or ``editable`` (pip install -e: a direct_url.json saying so)."""
    for old in site.glob("pkg_net_plugin-*.dist-info"):
        shutil.rmtree(old)
    (site / "fe_pkg_net.py").write_text(textwrap.dedent(BACKBONE_PACKAGE.format(kernel=kernel)))
    info = site / f"pkg_net_plugin-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pkg-net-plugin\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[fusion_engine]\npkg-net-plugin = fe_pkg_net\n")
    (info / "RECORD").write_text(f"fe_pkg_net.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    if editable:
        (info / "direct_url.json").write_text(json.dumps({"url": f"file://{site}", "dir_info": {"editable": True}}))
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
    assert code["plugin"] == {"distribution": "pkg-net-plugin", "version": "0.2.0"}  # a release: its version
    assert set(code) - {"engine_source_sha256"} == {"engine", "plugin", "torch", "timm"}
    assert code["torch"].count(".") == 1
    sys.modules.pop("fe_pkg_net", None)


def test_an_edited_plugin_package_installed_editable_is_a_new_member_at_the_same_version(tmp_path, monkeypatch):
    """pip install -e: the version stays while the code changes, so the source's sha256 is the key's."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    install(site, "0.1.0", kernel=3, editable=True)
    spec = one_member(tmp_path / "spec.yaml", {"backbone": "pkg-net"}, [str(TOY_PLUGIN)])
    first = run(spec, tmp_path / "reg")
    assert run(spec, tmp_path / "reg")["reused"] == ["m"]  # nothing changed: the same key
    install(site, "0.1.0", kernel=5, editable=True)
    second = run(spec, tmp_path / "reg")
    assert second["trained"] == ["m"] and second["members"]["m"]["key"] != first["members"]["m"]["key"]
    with Registry(tmp_path / "reg") as reg:
        code = reg.verify(reg.get(second["members"]["m"]["key"])).key_material["code"]
    assert set(code["plugin"]) == {"distribution", "version", "source_sha256"}
    sys.modules.pop("fe_pkg_net", None)


def test_the_engine_and_first_party_plugins_from_a_source_tree_enter_keys_by_their_source(tmp_path, toy_run):
    """This checkout is an editable install: its versions do not move as its code does, so the
    engine's and the timm plugin's sources are in a member's key; an edit to any file of a
    package changes its sha256."""
    import fusion_engine
    from fusion_engine.plugins import get_plugins
    from fusion_engine.provenance import member_code, package_sha256, source_identity

    if not source_identity("fusion-engine", fusion_engine.__file__):
        pytest.skip("fusion-engine is installed from a wheel here: its version is its identity")
    code = member_code(get_plugins([]).catalog().get("backbone", "resnet18"))
    assert code["engine_source_sha256"] == package_sha256(str(Path(fusion_engine.__file__).resolve()))
    assert code["plugin"]["distribution"] == "fusion-engine" and len(code["plugin"]["source_sha256"]) == 64
    with Registry(toy_run.registry) as reg:
        stored = reg.verify(reg.get(toy_run.keys["net-a"])).key_material["code"]
    assert stored["engine_source_sha256"] == code["engine_source_sha256"]

    package = tmp_path / "pkg"
    shutil.copytree(Path(fusion_engine.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = package_sha256(str(package / "__init__.py"))
    assert package_sha256(str(package / "__init__.py")) == before  # unchanged: the same
    (package / "training.py").write_text((package / "training.py").read_text() + "\n# an edit\n")
    assert package_sha256(str(package / "__init__.py")) != before


def test_files_anywhere_in_params_enter_the_key_by_content_relative_to_the_spec(tmp_path, monkeypatch):
    from fusion_engine.provenance import params_for_key

    spec_dir = tmp_path / "spec"
    (spec_dir / "ckpts").mkdir(parents=True)
    weights = spec_dir / "w.bin"
    weights.write_bytes(b"one")
    (spec_dir / "ckpts" / "a.bin").write_bytes(b"a")
    params = {"files": ["w.bin"], "nested": {"ckpt": str(weights)}, "folder": "ckpts", "name": "w"}
    monkeypatch.chdir(tmp_path)  # not the spec's folder: relative paths are the spec's, not the cwd's
    first = params_for_key(params, spec_dir)
    assert first["files"][0] == first["nested"]["ckpt"] == {"sha256": hashlib.sha256(b"one").hexdigest()}
    assert set(first["folder"]) == {"tree_sha256"} and first["name"] == "w"
    moved = tmp_path / "elsewhere"
    shutil.copytree(spec_dir, moved)
    assert params_for_key(params, moved) == first  # the same bytes elsewhere: the same key
    weights.write_bytes(b"two")
    assert params_for_key(params, spec_dir)["files"][0] != first["files"][0]
    (spec_dir / "ckpts" / "b.bin").write_bytes(b"b")  # a file added to the folder
    assert params_for_key(params, spec_dir)["folder"] != first["folder"]


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
