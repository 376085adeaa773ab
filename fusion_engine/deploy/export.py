"""``fusion-engine export``: one leaderboard row of a finished run, as a folder that predicts.

What goes in (see :mod:`fusion_engine.deploy.card` for the layout): each member's weights from
the zoo (checked against the zoo's checksums as they are copied), its backbone, params, input
config and temperature; the fitted fuser's JSON state; plugin files the run loaded from its spec,
and files a member's params name; the card; ``SHA256SUMS``. With ``onnx=True`` also
``model.onnx`` (:mod:`fusion_engine.deploy.onnx_file`).

The folder is written beside its destination and renamed into place only once it is complete
and checked, so a failed or interrupted export leaves nothing half-written (a killed one leaves
its hidden scratch folder, ``.DIR.export-<pid>-<hex>``, which the next export to DIR removes).
``--force`` replaces only an earlier export, never another folder, the registry or a run.

The check: the folder is loaded as a user would load it and predicts up to ``check_images`` of
the run's own test images (decoded from the dataset again), and the largest difference from the
run's stored test probabilities is recorded in the card (and the ONNX graph's from the engine's,
when there is one). A run predicted on CPU matches to about 1e-7; a warning says when it is over 1e-5.

Members brought as predictions only (no weights) cannot be exported; the export says so in one
line.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from glob import escape as glob_escape
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FusionEngineError, SpecError
from ..files import write_json
from .card import (CARD_FILE, FUSER_FILE, WEIGHTS_FILE, ExportCard, ExportedFuser, ExportedInput, ExportedMember,
                   PluginRef, file_sha256, write_sums)
from .onnx_file import write_onnx

log = logging.getLogger("fusion_engine")

#: how many of the run's test images an export predicts to check itself, by default
CHECK_IMAGES = 64
#: above this, the check warns (the promise on CPU; ONNX Runtime's is in :mod:`.onnx_file`)
TORCH_TOLERANCE = 1e-5
ONNX_INPUTS = ("uint8", "float32")


@dataclass
class ExportResult:
    path: Path
    card: ExportCard


def export_ensemble(run: str, row: str | None = None, *, out: str | os.PathLike, registry: str | os.PathLike | None = None,
                    onnx: bool = False, onnx_input: str = "uint8", force: bool = False,
                    check_images: int = CHECK_IMAGES, console=None) -> ExportResult:
    """Export ``row`` of run ``run`` (a run id or a unique prefix) from ``registry`` to the folder
    ``out``; ``row`` defaults to the leaderboard's best fuser (its best row when it has none).

    ``onnx`` also writes ``model.onnx`` with ``onnx_input`` images (``"uint8"``, 0..255, or
    ``"float32"``, 0..1). ``force`` replaces an earlier export at ``out`` (never another folder). ``check_images`` test images are
    predicted to check the export (0: none).
    """
    from rich.console import Console

    from ..zoo import Registry, resolve_registry

    console = console or Console(stderr=True, quiet=True)
    if onnx_input not in ONNX_INPUTS:
        raise FusionEngineError(f"unknown ONNX input type '{onnx_input}'; use uint8 or float32")
    registry_dir = resolve_registry(registry)
    given = out
    out = check_destination(out, force, registry_dir)
    if onnx:
        from .graph import need_onnx

        need_onnx(export=True)
    if not registry_dir.is_dir():
        raise FusionEngineError(f"no registry at {registry_dir}")
    with Registry(registry_dir, create=False) as reg:
        exporter = _Exporter(reg, run, row, console)
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = _scratch(out, "export")
        try:
            tmp.mkdir()
            card = exporter.write(tmp, onnx=onnx, onnx_input=onnx_input, check_images=check_images)
            write_sums(tmp)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExportResult(Path(given), card)


def check_destination(out: str | os.PathLike, force: bool, registry: Path) -> Path:
    """``out`` as an absolute path, once it is known to be a place an export may be written:
    not the current folder (nor one holding it), not in the registry (nor holding it), under
    folders (not a file); and, when it exists, an empty folder, or with ``force`` an earlier
    export (it has a card). ``--force`` never replaces a folder that is not an export, so a
    mistyped ``--out`` cannot delete a user's files, a run or the zoo. Checked before anything
    slow is done."""
    given = out
    out = Path(out).expanduser().absolute()
    resolved = out.resolve()
    for parent in (resolved, *resolved.parents):  # the first of out and its parents that exists must be a folder
        if parent.exists():
            if parent != resolved and not parent.is_dir():
                raise FusionEngineError(f"--out {given}: {parent} is a file, not a folder")
            break
    if out.exists() and not out.is_dir():
        raise FusionEngineError(f"--out {given}: exists and is not a folder")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FusionEngineError(f"--out {given}: is the current folder{'' if resolved == cwd else ' or holds it'}; "
                                f"export into a new folder, e.g. --out ./{out.name or 'ensemble'}-export")
    reg = registry.expanduser().resolve()
    if resolved == reg or reg in resolved.parents or resolved in reg.parents:
        where = "is the registry" if resolved == reg else "is inside the registry" if reg in resolved.parents else \
            "holds the registry"
        raise FusionEngineError(f"--out {given}: {where} {registry}; export to a folder outside it")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FusionEngineError(f"--out {given}: the folder exists and is not empty; choose another or pass --force "
                                    f"to replace an earlier export")
        if not _is_export(out):
            raise FusionEngineError(f"--out {given}: the folder is not empty and is not an earlier export (no "
                                    f"{CARD_FILE}); --force replaces only an export: choose another folder")
    return resolved


def _is_export(folder: Path) -> bool:
    try:
        card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(card, dict) and "run_id" in card and "members" in card


def _scratch(out: Path, what: str) -> Path:
    """A hidden folder beside ``out`` named for this process, so a later export can tell one left
    by a killed export (its process is gone) from one still being written."""
    return out.parent / f".{out.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}"


def _remove_stale(out: Path) -> None:
    """Remove the scratch folders beside ``out`` that exports killed before they could clean up
    left behind (an export interrupted by an error or Ctrl-C removes its own)."""
    for folder in out.parent.glob(f".{glob_escape(out.name)}.*-*-*"):
        what, _, rest = folder.name[len(out.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if what in ("export", "replaced") and pid.isdigit() and not _alive(int(pid)) and folder.is_dir():
            log.info("removing %s, left by an export that was killed", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = _scratch(out, "replaced")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Exporter:
    """One row of one run, read from the registry and written to a folder."""

    def __init__(self, reg, run: str, row: str | None, console):
        from ..runfolder import RunFolder, unindexed_run
        from ..zoo import ZooError

        self.reg, self.console = reg, console
        try:
            record = reg.find_run(run)
        except ZooError:  # a run folder the index does not list (written before the index existed)
            record = unindexed_run(reg, run)
            if record is None:
                raise
        if record["status"] != "complete":
            raise FusionEngineError(f"run {record['run_id']} is {record['status']}: only a complete run can be exported")
        self.run_id = record["run_id"]
        self.folder = RunFolder.complete(reg.run_dir(self.run_id))
        self.row = self._row(row)
        self.spec = self.folder.spec
        spec_file = self.folder.summary.get("spec_file")
        self.base_dir = Path(spec_file).parent if spec_file else self.folder.path
        self.plugin_files = [(self.base_dir / p).resolve() for p in self.spec.get("plugins", [])]
        from ..plugins import get_plugins

        self.plugins = get_plugins([p for p in self.plugin_files if p.is_file()])
        self.shipped: dict[str, str] = {}  # plugin module -> its file in the folder
        self.teachers: dict[str, dict[str, str]] = {}  # a student -> its teacher's name and kind

    def _row(self, name: str | None) -> dict:
        rows = self.folder.rows
        if name is None:
            fusers = [r for r in rows if r.get("kind") == "fuser"]
            return (fusers or rows)[0]
        for r in rows:
            if r["name"] == name:
                return r
        import difflib

        names = [r["name"] for r in rows]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FusionEngineError(f"run {self.run_id} has no row '{name}'{hint}; its rows: {', '.join(names)}")

    # -- the folder ---------------------------------------------------------------------------------
    def write(self, tmp: Path, *, onnx: bool, onnx_input: str, check_images: int) -> ExportCard:
        from .. import __version__
        from ..provenance import library_versions

        row = self.row
        fuser_desc = self.folder.fusers.get(row["name"]) if row.get("kind") == "fuser" else None
        if row.get("kind") == "fuser" and fuser_desc is None:
            raise FusionEngineError(f"run {self.run_id}: no fusers/{row['name']}.json, so row {row['name']} cannot be exported")
        names = fuser_desc["members"] if fuser_desc else [row["name"]]
        members = [self._member(name, tmp) for name in names]
        self.console.log(f"exporting row [bold]{row['name']}[/] of run {self.run_id} ({len(names)} member"
                         f"{'s' if len(names) != 1 else ''})")
        fuser = None
        if fuser_desc is not None:
            fuser = ExportedFuser(name=row["name"], fuser=fuser_desc["fuser"],
                                  plugin=self._plugin_ref("fuser", fuser_desc["fuser"], tmp, f"fuser {row['name']}"),
                                  params=fuser_desc.get("params") or {}, temperature=bool(fuser_desc.get("temperature")))
            write_json(tmp / FUSER_FILE, fuser_desc)
        dataset = self._dataset()
        from ..preprocess import RESIZE_PIL, resize_method

        summary_data = self.folder.summary.get("data", {})
        card = ExportCard(
            fusion_engine=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            run_id=self.run_id, experiment=self.folder.summary.get("experiment") or self.spec.get("name", "?"),
            row=row["name"], kind="fuser" if fuser is not None else "student" if row.get("kind") == "student" else "member",
            teacher=self.teachers.get(row["name"]) if fuser is None else None, classes=self.folder.classes,
            resize=resize_method(dataset.images) if dataset is not None else RESIZE_PIL,
            members=members, fuser=fuser, scores=row,
            data={"dataset": self.spec.get("data", {}).get("dataset"), **{k: summary_data.get(k) for k in
                  ("fingerprint", "split_sha256", "split_sizes")}},
            spec=self.spec, versions=library_versions(),
        )
        if dataset is None:
            log.warning("run %s: its dataset cannot be loaded here, so images are assumed to be resized by PIL and the "
                        "export is not checked against the run's test probabilities", self.run_id)
        write_json(tmp / CARD_FILE, card.to_json())
        from .ensemble import Ensemble

        ensemble = Ensemble(tmp, card, runtime="torch", device="cpu")
        check = self._check_images(dataset, check_images)
        if check is not None:
            card.check = self._check(ensemble, *check)
        if onnx:
            card.onnx = write_onnx(ensemble, tmp, onnx_input, None if check is None else check[0], self.console)
        write_json(tmp / CARD_FILE, card.to_json())
        return card

    def _member(self, name: str, tmp: Path) -> ExportedMember:
        from ..zoo import ZooError, short

        run_card = self.folder.cards.get(name)
        if run_card is None:
            raise FusionEngineError(f"run {self.run_id}: no members/{name}/card.json")
        key, source = run_card.key, run_card.source
        if source == "predictions":
            raise FusionEngineError(f"row {self.row['name']} uses member {name}, which was brought as predictions only "
                                    f"(no weights): it cannot be exported; export a row without it")
        entry = self.reg.get(key) if key else None
        if entry is None:
            raise FusionEngineError(f"member {name} (key {short(key) if key else '?'}) is no longer in the zoo of "
                                    f"{self.reg.root}; it cannot be exported")
        def waiting() -> None:
            self.console.log(f"waiting for another run to finish with member {name} (key {short(key)})")

        with self.reg.lock(key, on_wait=waiting):
            try:
                zoo_card = self.reg.verify(entry)
            except ZooError as exc:
                raise FusionEngineError(f"member {name}: {exc}") from None
            source = getattr(zoo_card, "source", source) or "trained"
            if source == "predictions" or WEIGHTS_FILE not in entry.files:
                raise FusionEngineError(f"row {self.row['name']} uses member {name}, which has no weights in the zoo "
                                        f"(source: {source}): it cannot be exported; export a row without it")
            weights = tmp / "members" / name / WEIGHTS_FILE
            weights.parent.mkdir(parents=True)
            shutil.copyfile(self.reg.member_dir(key) / WEIGHTS_FILE, weights)
            if file_sha256(weights) != entry.files[WEIGHTS_FILE]["sha256"]:
                raise FusionEngineError(f"member {name}: zoo/{short(key)}/{WEIGHTS_FILE} changed while it was copied")
        teacher = zoo_card.teacher
        if teacher is not None:
            self.teachers[name] = {"name": teacher.name, "kind": teacher.kind}
        who = f"member {name}"
        params, files = self._param_files(dict(zoo_card.spec.params), zoo_card.key_material.get("params", {}), tmp, who)
        material_data = zoo_card.key_material.get("data") or {}
        image_size = material_data["image_size"] if "image_size" in material_data else self.spec.get("data", {}).get("image_size")
        # the zoo card's input, field by name (a field added to both formats travels without a change here)
        inp = ExportedInput.model_validate(zoo_card.input.model_dump(include=set(ExportedInput.model_fields)))
        order = None
        names = zoo_card.origin.class_names if zoo_card.origin is not None else None
        if names is not None:  # weights trained elsewhere in another class order: as the run reordered them
            from ..weights import class_order

            order = class_order(names, list(zoo_card.data.classes), what=f"member {name}").tolist()
            order = None if order == list(range(len(order))) else order
        if len(zoo_card.data.classes) != len(self.folder.classes):
            raise FusionEngineError(f"member {name} has {len(zoo_card.data.classes)} classes, the run {len(self.folder.classes)}")
        return ExportedMember(
            name=name, key=key, source=source, backbone=zoo_card.backbone,
            plugin=self._plugin_ref("backbone", zoo_card.backbone, tmp, who,
                                    trained_with=(zoo_card.key_material.get("code") or {}).get("plugin")),
            params=params, files=files, image_size=image_size, num_classes=len(zoo_card.data.classes),
            seed=zoo_card.spec.seed or 0, class_order=order, input=inp,
            temperature=run_card.temperature, weights=weights.relative_to(tmp).as_posix())

    def _param_files(self, params: dict, keyed: dict, tmp: Path, who: str) -> tuple[dict, dict[str, str]]:
        """Files a member's params name (pretrained weights its backbone reads when built), copied
        into ``files/``: the folder must build the network on a machine without them."""
        files = {}
        for name, value in params.items():
            was_file = isinstance(keyed.get(name), dict) and "sha256" in keyed[name]
            if isinstance(value, str) and value and os.path.isfile(value):
                digest = file_sha256(Path(value))
                if was_file and keyed[name]["sha256"] != digest:
                    log.warning("%s: params.%s names %s, whose bytes changed since it was trained", who, name, value)
                rel = f"files/{digest}{Path(value).suffix}"
                (tmp / "files").mkdir(exist_ok=True)
                shutil.copyfile(value, tmp / rel)
                files[name] = rel
            elif was_file:
                raise FusionEngineError(f"{who}: params.{name} names {value}, which no longer exists; its network cannot be "
                                        f"built without it")
        return params, files

    def _plugin_ref(self, kind: str, name: str, tmp: Path, who: str, trained_with: dict | None = None) -> PluginRef:
        """Which plugin provides ``name``; a plugin file is copied into ``plugins/``."""
        try:
            provided = self.plugins.catalog().get(kind, name)
        except SpecError as exc:
            missing = [str(p) for p in self.plugin_files if not p.is_file()]
            hint = f" (the run's plugin files {', '.join(missing)} are gone)" if missing else ""
            raise FusionEngineError(f"{who}: {exc}{hint}") from None
        info = self.plugins.info[provided.plugin]
        if info.source != "file":
            return PluginRef(plugin=provided.plugin, distribution=info.distribution, version=info.version)
        if trained_with and trained_with.get("sha256") and trained_with["sha256"] != info.sha256:
            log.warning("%s: plugin file %s changed since it was trained; the export uses it as it is now", who, info.path)
        if provided.plugin not in self.shipped:
            stem = Path(info.path).stem
            rel = f"plugins/{stem}.py"
            n = 1
            while rel in self.shipped.values():
                n += 1
                rel = f"plugins/{stem}_{n}.py"
            (tmp / "plugins").mkdir(exist_ok=True)
            shutil.copyfile(info.path, tmp / rel)
            self.shipped[provided.plugin] = rel
        return PluginRef(plugin=provided.plugin, file=self.shipped[provided.plugin], sha256=info.sha256)

    # -- checking -----------------------------------------------------------------------------------
    def _dataset(self):
        """The run's dataset, loaded by its plugin as the run did; None when it cannot be here."""
        data = self.spec.get("data") or {}
        try:
            provided = self.plugins.catalog().get("dataset", data.get("dataset"))
            params = provided.record.params.model_validate(data.get("params") or {}, context={"base_dir": self.base_dir})
            return provided.record.load(params, base_dir=self.base_dir)
        except Exception as exc:  # moved files, a plugin gone: the export works, unchecked
            log.info("run %s: cannot load its dataset: %s: %s", self.run_id, type(exc).__name__, exc)
            return None

    def _check_images(self, dataset, n: int) -> tuple[Any, np.ndarray] | None:
        """Up to ``n`` of the run's test images, evenly spread, and their positions in the test split."""
        if dataset is None or n <= 0:
            return None
        test_ids = [str(i) for i in self.folder.split["test"]["ids"]]
        where = {str(i): k for k, i in enumerate(dataset.ids)}
        if any(i not in where for i in test_ids):
            log.warning("run %s: its dataset has changed (test samples are missing); the export is not checked", self.run_id)
            return None
        positions = np.unique(np.linspace(0, len(test_ids) - 1, num=min(n, len(test_ids))).round().astype(int))
        indices = np.array([where[test_ids[p]] for p in positions])
        images = dataset.images
        chosen = images[indices] if isinstance(images, np.ndarray) and images.dtype != object else [images[i] for i in indices]
        return chosen, positions

    def _check(self, ensemble, images, positions: np.ndarray) -> dict[str, Any]:
        stored = self.folder.probabilities("test")[self.row["name"]][positions]
        got = ensemble.predict_proba(images)
        diff = float(np.abs(got - stored).max())
        self.console.log(f"checked on {len(positions)} of the run's test images: max |export - run| = {diff:.1e}")
        if diff > TORCH_TOLERANCE:
            device = self.folder.summary.get("device", "?")
            log.warning("the export's probabilities differ from the run's stored ones by up to %.1e on %d test images "
                        "(the run predicted with device %s; on CPU they agree to 1e-5)", diff, len(positions), device)
        return {"split": "test", "images": int(len(positions)), "max_abs_diff": diff, "runtime": "torch", "device": "cpu"}
