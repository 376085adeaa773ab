"""Shared fixtures. Tests make their own data; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


def square_colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    """A colour unique to each (class, image) pair in a small folder, so every file differs."""
    return ((40 * class_index + 7 * image_index) % 256, (90 + 13 * image_index) % 256, (200 - 30 * class_index) % 256)


@pytest.fixture
def make_image_folder(tmp_path):
    """A factory for tiny image folders of solid-coloured squares.

    ``make_image_folder()`` gives ``root/<class>/<class>-<i>.png``; with ``splits=("train",
    "val", "test")`` it gives ``root/<split>/<class>/...``. Returns ``root``.
    """

    def make(
        name: str = "images",
        classes: tuple[str, ...] = ("cat", "dog", "fox"),
        per_class: int = 4,
        size: int = 16,
        splits: tuple[str, ...] | None = None,
        suffix: str = ".png",
    ) -> Path:
        root = tmp_path / name
        for part in splits or (None,):
            for c, class_name in enumerate(classes):
                folder = root / part / class_name if part else root / class_name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    Image.new("RGB", (size, size), square_colour(c, i)).save(folder / f"{class_name}-{i}{suffix}", format="PNG")
        return root

    return make
