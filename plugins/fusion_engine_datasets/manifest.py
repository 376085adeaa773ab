"""``csv``: a manifest with one row per image: its path, its class name and, optionally, its split.

Image paths are relative to the CSV file's folder (absolute ones are kept). Class names are the
distinct labels, sorted. Sample ids are the paths as written. A path listed twice is an error:
the same image in two splits would leak.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from fusion_engine import SPLITS, FusionEngineError, ImageDataset, Params

from .paths import check_at_validation, missing_file, resolve_path



class CsvParams(Params):
    path: Path = Field(description="the CSV manifest, with a header row; relative to the spec file")
    path_column: str = Field("path", min_length=1, description="column holding image paths, relative to the CSV's folder")
    label_column: str = Field("label", min_length=1, description="column holding class names")
    split_column: Optional[str] = Field(
        None, min_length=1, description="column holding train/val/test per image; default: the engine splits"
    )

    @field_validator("path")
    @classmethod
    def _manifest_exists(cls, path: Path, info: ValidationInfo) -> Path:
        return check_at_validation(path, info, missing_file)


def load_csv_manifest(params: CsvParams, base_dir: Path | str = ".") -> ImageDataset:
    manifest = resolve_path(params.path, base_dir)
    if problem := missing_file(manifest):
        raise FusionEngineError(f"csv: {problem}")
    columns = [params.path_column, params.label_column] + ([params.split_column] if params.split_column else [])
    paths: list[Path] = []
    ids: list[str] = []
    names: list[str] = []
    split: list[str] = []
    first_line: dict[Path, int] = {}
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            found = reader.fieldnames
            if not found:
                raise FusionEngineError(f"csv {manifest}: the file is empty; expected a header row with {', '.join(columns)}")
            missing = [c for c in columns if c not in found]
            if missing:
                raise FusionEngineError(
                    f"csv {manifest}: missing columns: {', '.join(missing)}; "
                    f"found: {', '.join(found)}"
                )
            for row in reader:
                where = f"csv {manifest}, line {reader.line_num}"
                values = {c: (row.get(c) or "").strip() for c in columns}
                for column in columns:
                    if not values[column]:
                        raise FusionEngineError(f"{where}: empty {column}")
                image = (manifest.parent / values[params.path_column]).resolve()
                if not image.is_file():
                    raise FusionEngineError(f"{where}: no such image: {image}")
                if image.stat().st_size == 0:  # is_file's stat is cached by the OS: this costs nothing more
                    raise FusionEngineError(f"{where}: image {image} is empty (0 bytes)")
                if image in first_line:
                    raise FusionEngineError(f"{where}: {image} is already listed on line {first_line[image]}")
                first_line[image] = reader.line_num
                if params.split_column:
                    part = values[params.split_column].lower()
                    if part not in SPLITS:
                        raise FusionEngineError(f"{where}: split '{values[params.split_column]}' is not one of {', '.join(SPLITS)}")
                    split.append(part)
                paths.append(image)
                ids.append(Path(values[params.path_column]).as_posix())
                names.append(values[params.label_column])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FusionEngineError(f"csv {manifest}: cannot read: {exc}") from None
    if not paths:
        raise FusionEngineError(f"csv {manifest}: no rows after the header")
    class_names, labels = np.unique(np.asarray(names, dtype=object), return_inverse=True)
    return ImageDataset(
        images=paths,
        labels=labels,
        class_names=[str(c) for c in class_names],
        ids=ids,
        split=np.asarray(split, dtype=object) if params.split_column else None,
        description=f"csv manifest {manifest}" + (f", column '{params.split_column}'" if params.split_column else ""),
    )
