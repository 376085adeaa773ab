"""The ray executor, on a local Ray instance with two CPUs: members as Ray tasks, results through
the object store into the zoo, failures isolated, and the leaderboard equal to a local run's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TOY, TOY_PLUGIN, cli, latest_run, toy_spec_data, write_spec
from fusion_engine import FusionEngineError
from fusion_engine.members import MembersFailed
from fusion_engine.runner import run_experiment

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'fusion-engine[ray]'")

TIMING_COLUMNS = {"train_seconds", "infer_ms_per_image", "fit_seconds", "predict_ms_per_image", "pareto"}


def ray_spec(path: Path, flag: Path, executor: str | list = "ray", members: list | None = None) -> Path:
    """The toy members and a third, flaky one (it fails while ``flag`` exists), run by ``executor``."""
    flaky = {"name": "net-c", "backbone": "flaky-net", "params": {"fail_while": str(flag)},
             "train": {"epochs": 2, "batch_size": 16}}
    return write_spec(path, toy_spec_data(name="raytoy", executor=executor, members=members or [*TOY["members"], flaky],
                                          fusers=[{"name": "avg", "fuser": "toy-mean"}]))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (the executor uses a Ray already initialised)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


def record_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_a_ray_run_equals_the_local_run_of_the_same_spec(local_ray, tmp_path):
    import torch

    flag = tmp_path / "absent-flag"
    spec_ray = ray_spec(tmp_path / "ray.yaml", flag, "ray")
    spec_local = ray_spec(tmp_path / "local.yaml", flag, "local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU Ray task runs, so both compute the same floats
    try:
        local = run_experiment(spec_local, registry=tmp_path / "local-reg", quiet=True)
    finally:
        torch.set_num_threads(threads)
    remote = run_experiment(spec_ray, registry=tmp_path / "ray-reg", quiet=True)

    rec = record_of(remote.run_dir)
    assert rec["status"] == "complete" and rec["executor"] == "ray"
    assert sorted(rec["trained"]) == ["net-a", "net-b", "net-c"]
    assert {m["executor"] for m in rec["members"].values()} == {"ray"}
    assert {n: m["key"] for n, m in rec["members"].items()} == {n: m["key"] for n, m in record_of(local.run_dir)["members"].items()}

    # rows compared by name: net-a and net-c score alike, so their ranks are decided by measured time
    boards = [pd.read_csv(r.run_dir / "leaderboard.csv").set_index("name").sort_index() for r in (local, remote)]
    columns = [c for c in boards[0].columns if c not in (*TIMING_COLUMNS, "rank")]
    pd.testing.assert_frame_equal(boards[0][columns], boards[1][columns])
    for name in ("net-a", "net-b", "net-c"):  # weights and logits came back through the object store intact
        from safetensors.numpy import load_file

        key = rec["members"][name]["key"]
        stored = [load_file(reg / "zoo" / key / f) for reg in (tmp_path / "local-reg", tmp_path / "ray-reg")
                  for f in ("model.safetensors", "outputs.safetensors")]
        for a, b in ((stored[0], stored[2]), (stored[1], stored[3])):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_workers_read_images_from_the_dataset_not_from_pixels_the_driver_sent(local_ray, tmp_path, make_image_folder):
    """Under Ray the object store holds what opens a folder's images (paths, a cache path), and
    each task decodes them itself: the stored members equal a local run's, bit for bit."""
    import torch
    from safetensors.numpy import load_file

    make_image_folder(per_class=6, size=14)
    specs = {executor: write_spec(tmp_path / f"{executor}.yaml", toy_spec_data(
        name="folder", executor=executor,
        data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 8, "split": {"val": 0.25, "test": 0.25}},
        fusers=[{"name": "avg", "fuser": "toy-mean"}])) for executor in ("local", "ray")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU Ray task runs
    try:
        local = record_of(run_experiment(specs["local"], registry=tmp_path / "local-reg", quiet=True).run_dir)
    finally:
        torch.set_num_threads(threads)
    remote = record_of(run_experiment(specs["ray"], registry=tmp_path / "ray-reg", quiet=True).run_dir)
    assert remote["executor"] == "ray" and sorted(remote["trained"]) == ["net-a", "net-b"]
    for name, member in remote["members"].items():
        assert member["key"] == local["members"][name]["key"]
        for f in ("model.safetensors", "outputs.safetensors"):
            a, b = (load_file(reg / "zoo" / member["key"] / f) for reg in (tmp_path / "local-reg", tmp_path / "ray-reg"))
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_a_corrupt_image_a_worker_meets_fails_the_run_naming_it_not_each_member(local_ray, tmp_path, make_image_folder):
    from fusion_engine import UnreadableImage

    root = make_image_folder(per_class=6, size=14)
    broken = sorted(root.rglob("*.png"))[4]
    broken.write_bytes(b"not a png")  # the driver hashes its bytes; only decoding (in the Ray task) finds it broken
    spec = write_spec(tmp_path / "ray.yaml", toy_spec_data(
        name="corrupt", executor="ray",
        data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 8, "split": {"val": 0.25, "test": 0.25}},
        fusers=[{"name": "avg", "fuser": "toy-mean"}]))
    with pytest.raises(UnreadableImage) as caught:
        run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    assert str(caught.value) == f"cannot read image {broken}: not an image format Pillow can decode"
    assert not list((tmp_path / "reg" / "zoo").glob("*/card.json"))  # no member was stored


def test_a_tasks_splits_share_a_budget_of_its_share_of_the_node(local_ray, make_image_folder):
    from fusion_engine.imagesets import open_images
    from fusion_engine.records import InputConfig
    from fusion_engine.spec import ResourcesSpec
    from fusion_engine_executors.ray_executor import node_share, task_images

    paths = sorted(make_image_folder(per_class=4, size=12).rglob("*.png"))
    sets = open_images(paths, {"train": np.arange(8), "val": np.arange(8, 12)},
                       InputConfig(size=8, mean=(0.5,), std=(0.5,), in_chans=1), fingerprint="a" * 64,
                       cache_dir=None, workers=0, budget_setting=0.5)

    def in_task(images, cpus):  # as _fit_on_worker readies the sets it was sent
        images = task_images(images, ResourcesSpec(cpus=cpus))
        return images["train"].workers, images["train"].opener.budget(0)[1], images["val"].opener.budget is \
            images["train"].opener.budget

    workers, why, shared = ray.get(ray.remote(num_cpus=1)(in_task).remote(sets, 1))
    assert workers == 0 and why.endswith("times this task's share of the machine, 0.5") and shared
    workers, why, shared = ray.get(ray.remote(num_cpus=2)(in_task).remote(sets, 2))
    assert workers == 2 and "share" not in why and shared  # the whole of the local instance's 2 CPUs
    assert ray.get(ray.remote(num_cpus=1)(node_share).remote(1, 0)) == 0.5


def test_a_gpu_tasks_share_of_a_node_is_its_share_of_the_gpus(monkeypatch, caplog):
    from types import SimpleNamespace

    from fusion_engine_executors.ray_executor import node_share

    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "here"))
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "other", "Resources": {"CPU": 8.0}},
                                               {"NodeID": "here", "Resources": {"CPU": 96.0, "GPU": 8.0}}])
    assert node_share(4, 1) == 0.125  # 8 such tasks fit: each holds an eighth, not 4/96
    assert node_share(48, 0) == 0.5 and node_share(4, 0.5) == 0.0625
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "other", "Resources": {"CPU": 8.0}}])
    with caplog.at_level("WARNING", logger="fusion_engine"):
        assert node_share(4, 1) == 1.0
    assert "its memory budget is of the whole node" in caplog.text


def test_a_failing_member_fails_alone_and_a_rerun_trains_only_it(local_ray, tmp_path):
    flag = tmp_path / "flag"
    flag.touch()
    spec = ray_spec(tmp_path / "spec.yaml", flag)
    registry = tmp_path / "reg"
    with pytest.raises(MembersFailed) as info:
        run_experiment(spec, registry=registry, quiet=True)
    assert str(info.value) == (
        f"1 of 3 members failed: net-c: RuntimeError: flaky-net refuses to train while {flag} exists; "
        "the other 2 are ready in the zoo, so a re-run trains only net-c")
    failed = record_of(latest_run(registry))
    assert failed["status"] == "failed" and failed["failed"] == ["net-c"]
    assert sorted(failed["trained"]) == ["net-a", "net-b"]
    assert "flaky-net refuses to train" in failed["members"]["net-c"]["error"]
    log = (latest_run(registry) / "run.log").read_text()
    assert f'{TOY_PLUGIN}", line' in log and "in forward" in log  # the worker's traceback is in the log

    flag.unlink()
    rerun = record_of(run_experiment(spec, registry=registry, quiet=True).run_dir)
    assert rerun["status"] == "complete"
    assert rerun["trained"] == ["net-c"] and sorted(rerun["reused"]) == ["net-a", "net-b"]


def test_a_member_asking_for_more_than_any_node_has_fails_at_once(local_ray, tmp_path):
    spec = ray_spec(tmp_path / "spec.yaml", tmp_path / "absent")
    data = yaml.safe_load(spec.read_text())
    data["members"][1]["resources"] = {"cpus": 1, "gpus": 1}
    write_spec(spec, data)
    with pytest.raises(MembersFailed) as info:
        run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    assert str(info.value).startswith(
        "1 of 3 members failed: member net-b asks for 1 CPU and 1 GPU, more than any node of the Ray cluster has "
        "(the largest: 2 CPU, 0 GPU); lower its resources, or set the executor's wait_for_resources: true")
    assert sorted(record_of(latest_run(tmp_path / "reg"))["trained"]) == ["net-a", "net-c"]


def test_a_file_a_member_params_name_travels_with_its_task(tmp_path):
    """A worker on another node has no driver paths: the bytes go with the task and the params
    point at a copy on the worker."""
    import torch
    from safetensors.torch import save_file

    from fusion_engine.executors import MemberJob
    from fusion_engine.plugins import get_plugins
    from fusion_engine.records import InputConfig
    from fusion_engine.spec import ResourcesSpec, TrainSpec
    from fusion_engine_executors.ray_executor import _dumps, _fit_on_worker, _local_files

    weights = tmp_path / "driver-only" / "marker.safetensors"
    weights.parent.mkdir()
    save_file({"marker": torch.arange(5.0)}, str(weights))
    record = get_plugins([TOY_PLUGIN], entry_points=False).catalog().get("backbone", "file-net").record
    job = MemberJob(name="f", key="0" * 64, backbone=record, params=record.params(weights=weights),
                    train=TrainSpec(epochs=1, batch_size=8), seed=0, num_classes=3, image_size=8,
                    input=InputConfig(8, (0.5,), (0.5,), 1), device="cpu", resources=ResourcesSpec())
    files = {field: (path.name, path.read_bytes()) for field, path in _local_files(job).items()}
    assert list(files) == ["weights"]
    job_bytes = _dumps(job)
    weights.unlink()  # as on a worker node
    from fusion_engine.imagesets import ImageSet

    images = {s: ImageSet.of(torch.zeros((6, 1, 8, 8), dtype=torch.uint8)) for s in ("train", "val", "test")}
    threads = torch.get_num_threads()
    try:  # a worker sets its thread count to its task's CPUs; this process's must not change
        fitted = _fit_on_worker({}, job_bytes, images, {"train": np.arange(6) % 3, "val": np.arange(6) % 3}, files)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(fitted.state_dict["marker"], np.arange(5.0))


def test_the_command_line_picks_the_executor_and_its_params(tmp_path):
    """`--executor ray -E num_cpus=2` on a spec that says local: a Ray instance of its own."""
    spec = ray_spec(tmp_path / "spec.yaml", tmp_path / "absent", "local", members=TOY["members"])
    out = cli("run", spec, "--registry", tmp_path / "reg", "--executor", "ray", "-E", "num_cpus=2",
              env={"RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr
    assert "net-a submitted to Ray (1 CPU, 0 GPU)" in out.stderr
    rec = record_of(Path(out.stdout.strip().splitlines()[-1]))
    assert rec["executor"] == "ray" and sorted(rec["trained"]) == ["net-a", "net-b"]
    spec_json = json.loads((Path(out.stdout.strip().splitlines()[-1]) / "spec.json").read_text())
    assert spec_json["executor"] == {"name": "ray", "params": {"address": None, "num_cpus": 2, "num_gpus": None,
                                                                "max_retries": 0, "wait_for_resources": False,
                                                                "runtime_env": {}}}


def test_bad_executor_input_is_one_line_and_exit_2(tmp_path):
    spec = ray_spec(tmp_path / "spec.yaml", tmp_path / "absent", "rai")
    out = cli("validate", spec)
    assert (out.returncode, out.stderr) == (2, f"{spec}: executor.name: unknown executor 'rai' (did you mean 'ray'?); "
                                               "installed: local, ray\n")
    out = cli("run", spec, "--executor", "ray", "-E", "num_cpu=2")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"{spec} (with --executor): executor.params.num_cpu: unknown field (did you mean 'num_cpus'?)")


def test_without_ray_installed_the_ray_executor_says_how_to_install_it(tmp_path, monkeypatch):
    spec = ray_spec(tmp_path / "spec.yaml", tmp_path / "absent", "ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(FusionEngineError, match=r"the ray executor needs Ray, which is not installed; "
                                                r"pip install 'fusion-engine\[ray\]'"):
        run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    assert record_of(latest_run(tmp_path / "reg"))["status"] == "failed"  # before any member trained


def test_a_run_whose_members_are_all_stored_never_starts_ray(tmp_path, monkeypatch):
    """The executor is made when a member first needs training: a cached run needs no cluster."""
    spec = ray_spec(tmp_path / "spec.yaml", tmp_path / "absent", "local")
    run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    ray_spec(spec, tmp_path / "absent", "ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # asking Ray for anything would fail
    rec = record_of(run_experiment(spec, registry=tmp_path / "reg", quiet=True).run_dir)
    assert rec["status"] == "complete" and sorted(rec["reused"]) == ["net-a", "net-b", "net-c"]
