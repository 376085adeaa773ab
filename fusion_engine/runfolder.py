"""The run folder, ``<registry>/runs/<run_id>/``: its layout, its one writer and its one reader.

=================================  ==============================================================
``spec.yaml``, ``spec.json``        the resolved spec: every default filled in, plugin params too
``run.json``                        status, timings, split sizes, data fingerprint, versions
``run.log``                         the run's log
``split.json``                      classes, and the sample ids and labels of train, val and test
``members/<name>/card.json``        the member as this run used it (:class:`RunMemberCard`): zoo
                                    key, trained or reused, input config, history, timings,
                                    temperature
``members/<name>/outputs.safetensors``  its val and test logits as fused (after calibration)
``fusers/<name>.json``              a fitted fuser: plugin, members, params, learned state
``leaderboard.csv|md|json``         one row per member and fuser, scored on test
``predictions_{val,test}.csv``      per sample: id, label and each row's predicted class
``probabilities.safetensors``       each row's class probabilities, keyed ``<row>/<split>``
``plots/``, ``report.html``         drawn from the files above (:mod:`fusion_engine.plots`,
                                    :mod:`fusion_engine.report`)
=================================  ==============================================================

Every file is written whole or not at all (:func:`fusion_engine.files.atomic_path`), so a run
killed at any moment leaves each file as it was or complete; JSON goes through the one codec
(:mod:`fusion_engine.jsoncodec`). Folders written by earlier versions read the same way. Nothing
else writes into the folder or reads a file of it by name: the runner, plots, report, export and
trackers all go through :class:`RunFolder`.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import FusionEngineError
from .files import atomic_path, read_json, write_atomic, write_json
from .jsoncodec import frame_rows
from .records import SCORED_SPLITS, SPLITS
from .zoo.card import CardInput

if TYPE_CHECKING:  # pragma: no cover
    from .leaderboard import Row
    from .members import MemberResult


SPEC_YAML, SPEC_JSON = "spec.yaml", "spec.json"
SUMMARY = "run.json"
LOG = "run.log"
SPLIT = "split.json"
LEADERBOARD = ("leaderboard.csv", "leaderboard.md", "leaderboard.json")
LEADERBOARD_FORMATS = ("csv", "md", "json")
PROBABILITIES = "probabilities.safetensors"
REPORT = "report.html"
PLOTS = "plots"


class RunMemberCard(BaseModel):
    """``members/<name>/card.json``: a member as one run used it; the member itself is described
    once, by its zoo card (``zoo``, ``key``).

    Cards of every version read: a field a version did not write is None (``action`` before
    members could be reused, ``source`` before the zoo: ``trained``), a field this version does not
    know is kept (``plugin``, ``params``). ``val_accuracy`` is written only by versions before the
    zoo, whose card held it. :meth:`to_json` gives back the fields a card was made or read with.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    key: Optional[str] = None
    action: Optional[str] = None  # trained, predicted, read or reused (MemberResult.action)
    source: str = "trained"  # trained, weights, predictions or student (MemberCard.source)
    zoo: Optional[str] = None  # its folder in the registry, relative to the registry's root
    backbone: Optional[str] = None
    temperature: Optional[float] = None  # set when its logits were temperature-scaled
    resumed_from_epoch: Optional[int] = None
    input: Optional[CardInput] = None
    best_epoch: Optional[int] = None
    history: Optional[list[dict[str, Any]]] = None
    n_params: Optional[int] = None
    train_seconds: Optional[float] = None
    predict_seconds: Optional[float] = None
    val_accuracy: Optional[float] = None

    @classmethod
    def of(cls, member: "MemberResult", zoo_path: str) -> "RunMemberCard":
        inp = member.input
        return cls(
            name=member.name, key=member.key, action=member.action, source=member.source, zoo=zoo_path,
            backbone=member.backbone, temperature=member.temperature, resumed_from_epoch=member.resumed_from_epoch,
            input=None if inp is None else {"size": inp.size, "mean": list(inp.mean), "std": list(inp.std),
                                            "in_chans": inp.in_chans},
            best_epoch=member.best_epoch, history=member.history, n_params=member.n_params,
            train_seconds=round(member.train_seconds, 3), predict_seconds=round(member.predict_seconds, 3))

    @classmethod
    def read(cls, path: Path) -> "RunMemberCard":
        data = read_json(path)
        if not isinstance(data, dict):
            raise FusionEngineError(f"{path}: not a member card (a JSON object)")
        try:
            return cls.model_validate({"name": path.parent.name, **data})
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"])
            raise FusionEngineError(f"{path}: does not read as a run's member card ({where}: {err['msg']})") from None

    def to_json(self) -> dict[str, Any]:
        """The card as ``card.json`` holds it: the fields it was made or read with, in the order
        above, then those this version does not know."""
        return self.model_dump(exclude_unset=True)

    def __getitem__(self, field: str) -> Any:
        """``card["temperature"]``, as cards read before they were typed: deprecated, use ``card.temperature``."""
        _dict_access_warning(field)
        try:
            return self.to_json()[field]
        except KeyError:
            raise KeyError(field) from None

    def get(self, field: str, default: Any = None) -> Any:
        """``card.get("temperature")``, as cards read before they were typed: deprecated."""
        _dict_access_warning(field)
        return self.to_json().get(field, default)


def _dict_access_warning(field: str) -> None:
    import warnings

    warnings.warn(f"run cards are typed now: read card.{field}, not card[{field!r}] or card.get({field!r})",
                  DeprecationWarning, stacklevel=3)


class RunFolder:
    """One run's folder: write it while the run goes, read it afterwards (``report``,
    ``leaderboard``, plots)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path) -> "RunFolder":
        folder = cls(path)
        try:
            folder.path.mkdir(parents=True)
        except OSError as exc:
            raise FusionEngineError(f"cannot create run folder {folder.path}: {exc.strerror}") from None
        return folder

    @classmethod
    def complete(cls, path: str | Path) -> "RunFolder":
        """A finished run's folder, for reading; an error when it has no leaderboard."""
        folder = cls(path)
        if not (folder.path / LEADERBOARD[2]).is_file():
            status = folder.summary.get("status")
            why = f" (its status is {status!r}; see run.log)" if status else ""
            raise FusionEngineError(f"{folder.path}: no leaderboard.json, so nothing to report{why}")
        return folder

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    def leaderboard_path(self, fmt: str) -> Path:
        """``leaderboard.<fmt>``, ``fmt`` one of ``csv``, ``md``, ``json``."""
        if fmt not in LEADERBOARD_FORMATS:
            raise ValueError(f"a leaderboard is written as {', '.join(LEADERBOARD_FORMATS)}, not {fmt!r}")
        return self.path / LEADERBOARD[LEADERBOARD_FORMATS.index(fmt)]

    # -- writing -----------------------------------------------------------------------------------
    def log_handler(self) -> logging.Handler:
        """A handler appending the run's log records to ``run.log``."""
        handler = logging.FileHandler(self.path / LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return handler

    def write_spec(self, resolved: dict) -> None:
        import yaml

        write_json(self.path / SPEC_JSON, resolved)
        write_atomic(self.path / SPEC_YAML, yaml.safe_dump(resolved, sort_keys=False))

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY, summary)
        self.__dict__.pop("summary", None)

    def write_split(self, classes: list[str], ids: dict[str, list], labels: dict[str, np.ndarray]) -> None:
        write_json(self.path / SPLIT, {"classes": list(classes),
                                       **{s: {"ids": list(ids[s]), "labels": np.asarray(labels[s]).tolist()}
                                          for s in SPLITS}})

    def write_member(self, member: "MemberResult", zoo_path: str) -> None:
        """``members/<name>/``: the logits this run fused (after calibration) and a card pointing at
        the zoo, where the weights live once."""
        from safetensors.numpy import save_file

        out = self.path / "members" / member.name
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "outputs.safetensors") as tmp:
            save_file({f"{s}_logits": np.ascontiguousarray(member.logits[s], dtype=np.float32) for s in SCORED_SPLITS},
                      str(tmp))
        write_json(out / "card.json", RunMemberCard.of(member, zoo_path).to_json())
        self.__dict__.pop("cards", None)

    def write_fuser(self, name: str, description: dict) -> None:
        folder = self.path / "fusers"
        folder.mkdir(exist_ok=True)
        write_json(folder / f"{name}.json", description)

    def write_leaderboard(self, df, *, meta: dict[str, Any]) -> list[Path]:
        """``leaderboard.csv``, ``.md`` and ``.json``. The JSON holds ``meta``, then how the board
        was built (its ``attrs``: the ranking metric, the best member, the bootstrap settings),
        then the rows (in the codec's frame-rows mode)."""
        from .leaderboard import to_markdown

        paths = [self.leaderboard_path(fmt) for fmt in LEADERBOARD_FORMATS]
        with atomic_path(paths[0]) as tmp:
            df.to_csv(tmp, index=False)
        write_atomic(paths[1], to_markdown(df))
        write_json(paths[2], {**meta, **df.attrs, "rows": frame_rows(df)})
        for name in ("leaderboard", "rows"):
            self.__dict__.pop(name, None)
        return paths

    def write_predictions(self, ids: dict[str, list], y: dict[str, np.ndarray], rows: list["Row"]) -> None:
        """``predictions_{val,test}.csv`` (per sample: the label and each row's predicted class) and
        ``probabilities.safetensors`` (each row's probabilities, keyed ``<row>/<split>``)."""
        import pandas as pd
        from safetensors.numpy import save_file

        with atomic_path(self.path / PROBABILITIES) as tmp:
            save_file({f"{row.name}/{s}": np.ascontiguousarray(row.proba[s], dtype=np.float64)
                       for row in rows for s in SCORED_SPLITS}, str(tmp))
        for s in SCORED_SPLITS:
            df = pd.DataFrame({"id": list(ids[s]), "label": y[s]})
            for row in rows:
                df[row.name] = np.argmax(row.proba[s], axis=1)
            with atomic_path(self.path / f"predictions_{s}.csv") as tmp:
                df.to_csv(tmp, index=False)

    def plots_folder(self) -> Path:
        """``plots/``, made if need be."""
        self.plots_dir.mkdir(exist_ok=True)
        return self.plots_dir

    def write_plot(self, name: str, fig, *, dpi: float) -> Path:
        """A matplotlib ``Figure`` as ``plots/<name>`` (PNG at ``dpi``); its path. Forked workers
        may write plots into one folder at once."""
        with atomic_path(self.plots_folder() / name) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
        return self.plots_dir / name

    def write_report(self, html: str) -> Path:
        return write_atomic(self.report_path, html)

    # -- reading -----------------------------------------------------------------------------------
    @cached_property
    def summary(self) -> dict:
        """``run.json``: status, timings, split sizes, versions."""
        return read_json(self.path / SUMMARY, {})

    @cached_property
    def leaderboard(self) -> dict:
        """``leaderboard.json``: how the board was built, and ``rows`` in rank order."""
        return read_json(self.path / LEADERBOARD[2])

    @property
    def rows(self) -> list[dict]:
        return self.leaderboard.get("rows", [])

    def leaderboard_text(self, fmt: str) -> str:
        """``leaderboard.<fmt>`` (``csv``, ``md`` or ``json``) as written; FileNotFoundError when
        the folder has none."""
        return self.leaderboard_path(fmt).read_text(encoding="utf-8")

    def leaderboard_frame(self):
        """The leaderboard as a pandas frame, with its ``attrs`` (ranking, best member, ...)."""
        import pandas as pd

        board = pd.DataFrame.from_records(self.rows)
        board.attrs = {k: v for k, v in self.leaderboard.items() if k != "rows"}
        return board

    @cached_property
    def spec(self) -> dict:
        return read_json(self.path / SPEC_JSON, {})

    @cached_property
    def spec_text(self) -> str | None:
        path = self.path / SPEC_YAML
        return path.read_text(encoding="utf-8") if path.is_file() else None

    @cached_property
    def split(self) -> dict:
        split = read_json(self.path / SPLIT)
        if split is None:
            raise FusionEngineError(f"{self.path}: no split.json")
        return split

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.split["classes"]]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.split[split]["labels"], dtype=np.int64)

    @cached_property
    def _probabilities(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        path = self.path / PROBABILITIES
        if not path.is_file():
            raise FusionEngineError(f"{self.path}: no {PROBABILITIES}")
        return load_file(str(path))

    def probabilities(self, split: str) -> dict[str, np.ndarray]:
        """Each row's class probabilities on ``split``, by row name."""
        suffix = f"/{split}"
        return {k[: -len(suffix)]: v for k, v in self._probabilities.items() if k.endswith(suffix)}

    @cached_property
    def cards(self) -> dict[str, RunMemberCard]:
        """``members/<name>/card.json`` by member name, in the spec's order."""
        found = {p.parent.name: RunMemberCard.read(p) for p in sorted((self.path / "members").glob("*/card.json"))}
        return self._in_spec_order(found, "members")

    @cached_property
    def fusers(self) -> dict[str, dict]:
        """``fusers/<name>.json`` by fuser name, in the spec's order."""
        found = {p.stem: read_json(p) for p in sorted((self.path / "fusers").glob("*.json"))}
        return self._in_spec_order(found, "fusers")

    def _in_spec_order(self, found: dict[str, Any], section: str) -> dict[str, Any]:
        order = [item.get("name") for item in self.spec.get(section, [])]
        return dict(sorted(found.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))

    @property
    def split_sizes(self) -> dict[str, int]:
        sizes = self.leaderboard.get("split_sizes") or self.summary.get("data", {}).get("split_sizes")
        if sizes:
            return {k: int(v) for k, v in sizes.items()}
        return {s: len(self.split[s]["ids"]) for s in SPLITS if s in self.split}


def unindexed_run(reg, run_id: str) -> dict | None:
    """A run folder of registry ``reg`` that its index does not list (written before the index
    existed), by its exact id: the fields of ``Registry.find_run`` it has; None when there is none."""
    from .zoo import ZooError

    try:
        summary = RunFolder(reg.run_dir(run_id)).summary
    except (ZooError, OSError, ValueError):
        return None
    if not summary:
        return None
    return {"run_id": run_id, "experiment": summary.get("experiment", "?"), "status": summary.get("status", "?")}
