"""Pretrained weights the way timm loads them: through the Hugging Face cache, offline, with the
weights' identity (repository, commit, file, sha256) in the member's zoo key. The cache is built
here with generated weights for timm's tiny ``test_resnet.r160_in1k``; nothing is downloaded."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import cli, summary, toy_spec_data, write_spec
from fusion_engine import FusionEngineError
from hub_cache import populate_hub_cache

torch = pytest.importorskip("torch")

MODEL = "test_resnet.r160_in1k"
REPO = "timm/test_resnet.r160_in1k"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache holding generated weights for MODEL, used by this process (and by CLI
    processes given its env); returns (cache folder, weights, sha256 of the file)."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    torch.manual_seed(123)
    weights = {k: v.clone().contiguous() for k, v in timm.create_model(MODEL).state_dict().items()}
    path = tmp_path / "generated.safetensors"
    save_file(weights, str(path))
    cache = tmp_path / "hub"
    populate_hub_cache(cache, REPO, {"model.safetensors": path})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache, weights, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_tagged_model_loads_its_weights_from_the_hub_cache_offline(hub):
    from fusion_engine_timm import TimmParams, build_model

    cache, weights, sha = hub
    built = build_model(MODEL, TimmParams(model=MODEL), num_classes=3)  # a tag: pretrained unless told otherwise
    loaded = built.module.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items() if not k.startswith("fc."))
    assert loaded["fc.weight"].shape == (3, weights["fc.weight"].shape[1])  # a fresh head for 3 classes
    assert (built.input.size, built.input.crop_pct, built.input.crop_mode) == (160, 0.95, "center")
    scratch = build_model(MODEL, TimmParams(model=MODEL, pretrained=False), num_classes=3).module.state_dict()
    assert not torch.equal(scratch["conv1.0.weight"], weights["conv1.0.weight"])


def test_the_weights_identity_names_repository_commit_file_and_content(hub):
    from fusion_engine_timm import TimmParams, timm_weights

    cache, _, sha = hub
    identity = timm_weights(TimmParams(model=MODEL))
    commit = (cache / "models--timm--test_resnet.r160_in1k" / "refs" / "main").read_text()
    assert identity == {"source": "hf-hub", "repo": REPO, "revision": commit, "file": "model.safetensors",
                        "sha256": sha}
    assert timm_weights(TimmParams(model=MODEL, pretrained=False)) is None
    assert timm_weights(TimmParams(model="test_resnet")) is None  # no tag: from scratch unless pretrained: true


def test_a_run_keys_its_member_by_the_weights_it_started_from(hub, make_image_folder, tmp_path):
    from fusion_engine.runner import run_experiment

    cache, _, sha = hub
    make_image_folder(per_class=4, size=40, classes=("a", "b"))
    spec = write_spec(tmp_path / "hub.yaml", toy_spec_data(
        name="hub", data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 32, "workers": 0},
        members=[{"name": "tiny", "backbone": "timm", "params": {"model": MODEL},
                  "train": {"epochs": 1, "batch_size": 4}}], fusers=[]))
    first = summary(run_experiment(spec, registry=tmp_path / "reg", quiet=True).run_dir)
    key = first["members"]["tiny"]["key"]
    card = json.loads((tmp_path / "reg" / "zoo" / key / "card.json").read_text())
    assert card["key_material"]["weights"]["sha256"] == sha
    assert card["key_material"]["weights"]["repo"] == REPO

    # other bytes under the same name (a new commit on the hub): another member, trained again
    from safetensors.torch import load_file, save_file

    changed = {k: v + 1 if v.is_floating_point() else v for k, v in load_file(
        str(next((cache / "models--timm--test_resnet.r160_in1k" / "snapshots").iterdir()) / "model.safetensors")).items()}
    save_file(changed, str(tmp_path / "changed.safetensors"))
    populate_hub_cache(cache, REPO, {"model.safetensors": tmp_path / "changed.safetensors"})
    second = summary(run_experiment(spec, registry=tmp_path / "reg", quiet=True).run_dir)
    assert second["trained"] == ["tiny"] and second["members"]["tiny"]["key"] != key


def test_weights_not_in_the_cache_are_one_line_before_any_run(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"}
    spec = write_spec(tmp_path / "missing.yaml", toy_spec_data(
        members=[{"name": "r18", "backbone": "resnet18", "params": {"pretrained": True}}], fusers=[]))
    result = cli("validate", spec, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert (f"members.0.params: pretrained weights for timm model 'resnet18' (timm/resnet18.a1_in1k@main: "
            f"model.safetensors or pytorch_model.bin) are not in the Hugging Face cache {tmp_path / 'empty-hub'} and "
            f"HF_HUB_OFFLINE=1; download them once with `hf download timm/resnet18.a1_in1k`") in line
    result = cli("run", spec, "--registry", tmp_path / "reg", env=env)
    assert result.returncode == 2 and not (tmp_path / "reg" / "runs").exists()


def test_pretrained_and_a_pretrained_file_together_are_refused(tmp_path):
    from fusion_engine_timm import BackboneParams
    from pydantic import ValidationError

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ValidationError, match="give pretrained: true .* or pretrained_file .*, not both"):
        BackboneParams(pretrained=True, pretrained_file=path)


def test_a_worker_with_other_weights_than_the_key_names_fails_the_member(hub):
    from fusion_engine.executors import MemberJob, check_weights
    from fusion_engine.plugins import get_plugins
    from fusion_engine.records import InputConfig
    from fusion_engine.spec import TrainSpec

    record = get_plugins().catalog().get("backbone", "timm").record
    params = record.params(model=MODEL)
    job = MemberJob(name="tiny", key="k" * 64, backbone=record, params=params, train=TrainSpec(), seed=0,
                    num_classes=3, image_size=None, input=InputConfig(size=160, mean=(0.5,) * 3, std=(0.5,) * 3),
                    pretrained={**record.weights(params), "sha256": "0" * 64})
    with pytest.raises(FusionEngineError, match=r"member tiny: the pretrained weights here \(timm/test_resnet.r160_in1k@"
                                                r"\w{12}/model.safetensors\) are not the ones its zoo key names"):
        check_weights(job)
    job.pretrained = record.weights(params)
    check_weights(job)  # the same: no error
