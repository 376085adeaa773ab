"""``fusion-engine predict``: images in, one row per image out.

INPUTs are image files, folders (searched recursively for image files by
:func:`fusion_engine.preprocess.image_files`, the ``imagefolder`` dataset's own walker: the same
extensions, hidden files skipped, symlinked folders followed) or CSV manifests (a ``path`` column, relative to the CSV's folder). Each image is predicted by
:meth:`fusion_engine.deploy.Ensemble.proba_batches`, the Python API's own path. An image that
cannot be read gets a row saying why and the others go on; the exit status is then 1, and the
summary line on stderr counts them.

Output: ``path``, ``class``, ``probability``, the next ``top_k - 1`` classes
(``class_2``, ``probability_2``, ...), with ``--probs`` every class's probability
(``proba_<class>``), and ``error``. CSV (the default, on stdout without ``--out``), Parquet or
JSON (a list of records with ``top_k`` and ``probabilities`` nested).
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections import Counter
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..preprocess import IMAGE_EXTENSIONS, image_files
from ..errors import FusionEngineError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".json": "json"}
MANIFEST_PATH_COLUMN = "path"


def output_format(out: str | None) -> str:
    """The format ``--out`` asks for, and that it can be written (its folder exists and is
    writable), checked before any image is read: a long predict never ends in an error about
    where its output goes."""
    if out is None:
        return "csv"
    path = Path(out)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FusionEngineError(f"--out {out}: unknown format; use a .csv, .parquet or .json file")
    folder = path.parent
    if not folder.is_dir():
        if folder.exists():
            raise FusionEngineError(f"--out {out}: {folder} is a file, not a folder")
        raise FusionEngineError(f"--out {out}: its folder {folder} does not exist; create it first or choose another")
    if path.is_dir():
        raise FusionEngineError(f"--out {out}: is a folder; name a file in it, e.g. {path / ('predictions' + path.suffix)}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FusionEngineError(f"--out {out}: its folder {folder} is not writable")
    return fmt


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], int]:
    """Image paths from INPUTs, in order: files as given, folders' image files sorted, manifests'
    rows; and how many files in folders were skipped as not images."""
    items: list[str] = []
    skipped = 0
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            others: Counter[str] = Counter()
            items += [str(p) for p in image_files(path, others)]
            skipped += sum(others.values())
        elif path.suffix.lower() == ".csv" and path.is_file():
            items += _manifest_paths(path)
        else:
            items.append(given)  # a missing or unreadable file is reported in its own row
    return items, skipped


def _manifest_paths(manifest: Path) -> list[str]:
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or MANIFEST_PATH_COLUMN not in reader.fieldnames:
                found = ", ".join(reader.fieldnames or []) or "no header"
                raise FusionEngineError(f"{manifest}: a manifest needs a '{MANIFEST_PATH_COLUMN}' column of image paths; "
                                        f"found: {found}")
            paths = []
            for row in reader:
                value = (row.get(MANIFEST_PATH_COLUMN) or "").strip()
                if value:
                    p = Path(value).expanduser()
                    paths.append(str(p if p.is_absolute() else manifest.parent / p))
            return paths
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FusionEngineError(f"{manifest}: cannot read the manifest: {exc}") from None


def records(paths: Sequence[str], proba: np.ndarray, errors: dict[int, str], classes: Sequence[str], *, top_k: int,
            probs: bool, nested: bool) -> list[dict[str, Any]]:
    """One record per image: flat columns for CSV and Parquet, nested ones for JSON."""
    order = np.argsort(-np.nan_to_num(proba, nan=-1.0), axis=1, kind="stable")[:, :top_k]
    out = []
    for i, path in enumerate(paths):
        failed = i in errors
        rec: dict[str, Any] = {"path": path, "class": None if failed else classes[order[i, 0]],
                               "probability": math.nan if failed else float(proba[i, order[i, 0]])}
        ranked = [] if failed else [(classes[c], float(proba[i, c])) for c in order[i]]
        if nested:
            rec["top_k"] = [{"class": c, "probability": p} for c, p in ranked]
            if probs:
                rec["probabilities"] = None if failed else {c: float(p) for c, p in zip(classes, proba[i])}
        else:
            for k in range(1, top_k):
                rec[f"class_{k + 1}"] = ranked[k][0] if ranked else None
                rec[f"probability_{k + 1}"] = ranked[k][1] if ranked else math.nan
            if probs:
                for c, name in enumerate(classes):
                    rec[f"proba_{name}"] = math.nan if failed else float(proba[i, c])
        rec["error"] = errors.get(i)
        out.append(rec)
    return out


def write_records(rows: list[dict[str, Any]], out: str | None, fmt: str) -> None:
    import json

    import pandas as pd

    from ..files import atomic_path, write_atomic

    if fmt == "json":
        text = json.dumps([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
                          indent=1, ensure_ascii=False) + "\n"
        if out is None:
            sys.stdout.write(text)
        else:
            write_atomic(out, text)
        return
    frame = pd.DataFrame.from_records(rows)
    if out is None:
        frame.to_csv(sys.stdout, index=False)
        return
    with atomic_path(out) as tmp:
        if fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)


def predict_command(args) -> int:
    """``fusion-engine predict DIR INPUT...`` (see the module docstring)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .ensemble import load

    fmt = output_format(args.out)
    if args.top_k < 1:
        raise FusionEngineError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise FusionEngineError(f"--batch-size must be at least 1, got {args.batch_size}")
    ensemble = load(args.dir, runtime=args.runtime, device=args.device)
    paths, skipped = expand_inputs(args.inputs)
    if not paths:
        raise FusionEngineError(f"no images found in {', '.join(args.inputs)} (folders are searched for "
                                f"{', '.join(IMAGE_EXTENSIONS)} files)")
    console = Console(stderr=True, quiet=args.quiet)
    top_k = min(args.top_k, len(ensemble.classes))
    proba = np.full((len(paths), len(ensemble.classes)), np.nan)
    errors: dict[int, str] = {}
    started = time.perf_counter()
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=args.quiet) as progress:
        task = progress.add_task("predict", total=len(paths))
        for batch in ensemble.proba_batches(paths, batch_size=args.batch_size):
            proba[batch.start:batch.start + len(batch.proba)] = batch.proba
            errors.update({batch.start + i: why for i, why in batch.errors.items()})
            progress.advance(task, len(batch.proba))
    seconds = time.perf_counter() - started
    write_records(records(paths, proba, errors, ensemble.classes, top_k=top_k, probs=args.probs, nested=fmt == "json"),
                  args.out, fmt)
    where = f" -> {args.out}" if args.out else ""
    failed = f"; {len(errors)} could not be read (see the error column)" if errors else ""
    skipped_note = f"; {skipped} files in folders skipped as not images" if skipped else ""
    console.print(f"{len(paths) - len(errors)} of {len(paths)} images predicted by {ensemble.name} "
                  f"({ensemble.runtime}, {ensemble.device}) in {seconds:.1f}s{failed}{skipped_note}{where}",
                  highlight=False, soft_wrap=True)
    return 1 if errors else 0
