"""``imagefolder``: one folder per class, as torchvision's ``ImageFolder`` reads it.

Two layouts:

- flat, ``root/<class>/<image>``: the engine splits it (stratified, seeded);
- split, ``root/{train,val,test}/<class>/<image>``: the dataset's own split is kept. All three
  folders are required, since the protocol needs val (to pick epochs and fit fusers) and test
  (to score), and each must hold the same classes.

``layout: auto`` (the default) picks split when ``root/train`` exists. Images may sit in
subfolders of a class folder; hidden files and folders are skipped, and so are files that are not
images (by extension), with one warning counting them. Sample ids are paths relative to ``root``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from fusion_engine import IMAGE_EXTENSIONS, SPLITS, FusionEngineError, ImageDataset, Params, image_files

from .paths import check_at_validation, missing_directory, resolve_path

log = logging.getLogger("fusion_engine")

# torchvision.datasets.folder.IMG_EXTENSIONS, without importing torchvision (it imports torch);
# the core's, which ``fusion-engine predict`` walks folders with too
IMG_EXTENSIONS = IMAGE_EXTENSIONS


class ImageFolderParams(Params):
    root: Path = Field(description="folder of class folders (or of train/val/test folders); relative to the spec file")
    layout: Literal["auto", "flat", "split"] = Field(
        "auto", description="split: root/{train,val,test}/<class>; flat: root/<class>; auto: split if root/train exists"
    )

    @field_validator("root")
    @classmethod
    def _root_exists(cls, root: Path, info: ValidationInfo) -> Path:
        return check_at_validation(root, info, missing_directory)


def load_image_folder(params: ImageFolderParams, base_dir: Path | str = ".") -> ImageDataset:
    root = resolve_path(params.root, base_dir)
    if problem := missing_directory(root):
        raise FusionEngineError(f"imagefolder: {problem}")
    skipped: Counter = Counter()
    folders = visible_subfolders(root)
    layout = params.layout
    if layout == "auto":
        layout = "split" if "train" in folders else "flat"
    if layout == "flat":
        class_names = folders
        if not class_names:
            raise FusionEngineError(f"imagefolder: no class folders in {root}; expected {root}/<class>/<image>")
        paths, labels = _scan_classes(root, class_names, skipped)
        split = None
    else:
        class_names, paths, labels, split = _scan_split_layout(root, folders, skipped)
    if skipped:
        kinds = ", ".join(f"{n} {ext or 'without an extension'}"
                          for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0] or "~")))
        log.warning("imagefolder: skipped %d files under %s that are not images (%s); images end in %s",
                    sum(skipped.values()), root, kinds, " ".join(IMG_EXTENSIONS))
    return ImageDataset(
        images=paths,
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        ids=[path.relative_to(root).as_posix() for path in paths],
        split=split,
        description=f"image folder {root}",
    )


def visible_subfolders(folder: Path) -> list[str]:
    """Sorted names of the non-hidden subfolders: the class order torchvision uses."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_split_layout(root: Path, folders: list[str], skipped: Counter):
    missing = [s for s in SPLITS if s not in folders]
    if missing:
        raise FusionEngineError(
            f"imagefolder: {root} has no {', '.join(f'{s}/' for s in missing)} folder; "
            f"a split layout needs train/, val/ and test/ (or set layout: flat)"
        )
    others = [f for f in folders if f not in SPLITS]
    if others:
        raise FusionEngineError(
            f"imagefolder: {root} mixes train/, val/, test/ with other folders ({', '.join(others)}); "
            f"move them or set layout: flat"
        )
    class_names = visible_subfolders(root / "train")
    if not class_names:
        raise FusionEngineError(f"imagefolder: no class folders in {root / 'train'}")
    paths, labels, split = [], [], []
    for part in SPLITS:
        part_dir = root / part
        found = visible_subfolders(part_dir)
        if found != class_names:
            lacks = sorted(set(class_names) - set(found))
            extra = sorted(set(found) - set(class_names))
            why = []
            if lacks:
                why.append(f"{part}/ lacks {', '.join(lacks)}")
            if extra:
                why.append(f"{part}/ has extra {', '.join(extra)}")
            raise FusionEngineError(
                f"imagefolder: class folders differ between {root / 'train'} and {part_dir}: {'; '.join(why)}"
            )
        part_paths, part_labels = _scan_classes(part_dir, class_names, skipped)
        paths += part_paths
        labels += part_labels
        split += [part] * len(part_paths)
    return class_names, paths, labels, np.asarray(split, dtype=object)


def _scan_classes(folder: Path, class_names: list[str], skipped: Counter) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        images = image_files(folder / name, skipped)
        if not images:
            raise FusionEngineError(
                f"imagefolder: class '{name}' has no images in {folder / name} (looked for {' '.join(IMG_EXTENSIONS)})"
            )
        paths += images
        labels += [label] * len(images)
    return paths, labels
