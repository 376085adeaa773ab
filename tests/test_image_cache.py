"""The decoded-image cache: a dataset of files is decoded once per registry, not once per run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import toy_spec_data, write_spec
from fusion_engine.cli import main
from fusion_engine.data import cached_images
from fusion_engine.preprocess import load_images
from fusion_engine.runner import run_experiment


def run(tmp_path: Path, member: str, seed: int) -> tuple[dict, str]:
    spec = write_spec(tmp_path / f"{member}.yaml", toy_spec_data(
        name="cached", seed=0,
        data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 8, "split": {"val": 0.25, "test": 0.25}},
        members=[{"name": member, "backbone": "toy-net", "seed": seed, "train": {"epochs": 1, "batch_size": 8}}],
        fusers=[{"name": "avg", "fuser": "toy-mean"}]))
    result = run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    return json.loads((result.run_dir / "run.json").read_text()), (result.run_dir / "run.log").read_text()


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "reg" / "cache" / "images").glob("*.safetensors"))


def test_a_second_run_reads_the_decoded_images_from_the_cache(make_image_folder, tmp_path, capsys):
    make_image_folder(per_class=8, size=20)
    first, first_log = run(tmp_path, "net-a", seed=0)
    assert first["trained"] == ["net-a"]
    assert "read from the cache" not in first_log
    cached = cache_files(tmp_path)
    assert len(cached) == 3  # one file per split: train, val and test

    second, second_log = run(tmp_path, "net-b", seed=1)  # another member on the same split: it needs pixels
    assert second["trained"] == ["net-b"]
    for path in cached:
        assert f"decoded images read from the cache {path}" in second_log
    assert cache_files(tmp_path) == cached

    size = sum(path.stat().st_size for path in cached)
    assert main(["zoo", "gc", "--cache", "--registry", str(tmp_path / "reg"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["what"] for r in report["removed"]] == ["decoded-image cache"] * 3
    assert report["bytes_freed"] == size
    assert cache_files(tmp_path) == []


def test_the_cache_holds_exactly_what_decoding_gives(make_image_folder, tmp_path):
    root = make_image_folder(per_class=5, size=12)
    paths = sorted(root.rglob("*.png"))
    decoded = load_images(paths, np.arange(len(paths)), 8, 3)
    first = cached_images(paths, "f" * 64, 8, 3, tmp_path / "cache")
    again = cached_images(paths, "f" * 64, 8, 3, tmp_path / "cache")
    assert first.equal(decoded) and again.equal(decoded)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    cached_images(paths, "f" * 64, 16, 3, tmp_path / "cache")  # another size: another file
    cached_images(paths, "e" * 64, 8, 3, tmp_path / "cache")  # other data: another file
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_arrays_in_memory_are_not_cached(tmp_path):
    images = np.zeros((6, 8, 8), dtype=np.uint8)
    cached_images(images, "f" * 64, 8, 1, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", [b"", b"not a safetensors file", None])
def test_an_unreadable_cache_is_decoded_again_with_a_warning(make_image_folder, tmp_path, caplog, damage):
    import logging

    root = make_image_folder(per_class=4, size=12)
    paths = sorted(root.rglob("*.png"))
    decoded = cached_images(paths, "f" * 64, 8, 3, tmp_path / "cache")
    [path] = (tmp_path / "cache").iterdir()
    if damage is None:  # a readable file of the wrong shape
        from safetensors.torch import save_file

        save_file({"images": decoded[:2].contiguous()}, str(path))
    else:
        path.write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="fusion_engine"):
        again = cached_images(paths, "f" * 64, 8, 3, tmp_path / "cache")
    assert again.equal(decoded)
    assert f"image cache {path} is unreadable" in caplog.text
    assert cached_images(paths, "f" * 64, 8, 3, tmp_path / "cache").equal(decoded)  # rewritten whole
