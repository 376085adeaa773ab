"""Everything about a spec that can be known without training, checked before anything runs.

``fusion-engine validate`` and ``fusion-engine run`` both call :func:`preflight`; ``run`` calls
it before it makes a run folder, so bad input never leaves a failed run in the registry. It
checks, beyond the spec's fields and plugin names (:func:`fusion_engine.resolve.prepare`):

- the data (:func:`fusion_engine.data.load_dataset`): the dataset plugin lists and checks its
  samples (missing or empty class folders, a manifest's columns, missing image files, empty
  labels; nothing is decoded), two classes at least, a split that can be made (enough samples
  per class), and a dataset's own split per class;
- each member to train: its network's input config (``data.mean``/``data.std`` of the right
  length), whatever its backbone plugin checks without training (``BackboneRecord.check``:
  for timm, the architecture's name, a ``pretrained_file``'s checksum and its tensors' names
  and shapes against the architecture, a feature map that small images shrink to nothing), its
  pretrained weights found (``BackboneRecord.weights``: timm's in the Hugging Face cache), and
  augmentation settings its pipeline uses (and a timm transform that builds);
- each member run from ``weights``: the file is a state dict that fits its network exactly
  (classifier included), in classes that are the dataset's;
- each member read from ``predictions``: the whole file is read and checked (every val and test
  id, the dataset's classes, finite values, probabilities that sum to 1);
- each ``zoo:`` member: one stored member matches it (several are told apart by the data they
  were trained on);
- each fuser: it can be made from its params, which suit its number of members
  (:meth:`fusion_engine.Fuser.check_members`), and it has the inference costs it needs;
- ``--retrain`` names members of the spec.

Plugin code run by these checks (a backbone's ``input_config``, ``check`` and ``build``, a
dataset's ``load``, a fuser's ``__init__``) that raises anything but a
:class:`~fusion_engine.FusionEngineError` is reported as one line naming the plugin and the
member (:func:`fusion_engine.errors.located`), not as a traceback.

Warnings (skipped files, a collapsing feature map, an ignored ``data.split``) are logged as
they are found and kept, so that the run can record them in ``run.log`` and ``run.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .augment import AugmentError, check_augment
from .errors import FusionEngineError, SpecError, first_line, kept_warnings, located, plugin_code
from .records import ImageDataset, InputConfig
from .resolve import ResolvedSpec

log = logging.getLogger("fusion_engine")


@dataclass
class Origin:
    """The file a member not trained here comes from: where it is, its sha256, and the class
    order its outputs are in (None: the dataset's), with the columns that reorder them."""

    path: Path
    sha256: str
    class_names: list[str] | None
    order: list[int]

    def for_key(self) -> dict:
        return {"sha256": self.sha256, "class_names": self.class_names}

    def for_card(self) -> dict:
        return {"file": self.path.name, **self.for_key()}


@dataclass
class Preflight:
    """What the checks found, by spec index where per member: the loaded and split dataset, each
    network's input config, the file of each member not trained here, the outputs read from each
    predictions file, the zoo entry each ``zoo:`` member names, and the warnings."""

    dataset: ImageDataset
    indices: dict[str, np.ndarray]
    fingerprint: str | None = None  # the dataset's, when a check needed it
    inputs: dict[int, InputConfig] = field(default_factory=dict)
    pretrained: dict[int, dict] = field(default_factory=dict)  # spec index -> pretrained weights' identity (a hub's)
    origins: dict[int, Origin] = field(default_factory=dict)
    predictions: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    references: dict[int, object] = field(default_factory=dict)  # spec index -> ZooEntry
    student_inputs: dict[int, InputConfig] = field(default_factory=dict)  # by index in ``students``
    student_pretrained: dict[int, dict] = field(default_factory=dict)  # by index in ``students``, as ``pretrained``
    warnings: list[logging.LogRecord] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)

    @property
    def ids(self) -> dict[str, list[str]]:
        return {s: [str(self.dataset.ids[i]) for i in idx] for s, idx in self.indices.items()}


def preflight(resolved: ResolvedSpec, *, registry: Path | None = None, retrain: tuple[str, ...] = ()) -> Preflight:
    """Check ``resolved`` (see the module docstring); the first problem raises, one line, naming it.

    ``registry`` is where ``zoo:`` members are looked up; ``retrain`` the members a run is asked
    to train again (``all`` for every one).
    """
    from .data import load_dataset

    with kept_warnings(log) as kept:
        check_retrain(resolved, retrain)
        dataset, indices = load_dataset(resolved)
        checked = Preflight(dataset, indices, warnings=kept)
        spec = resolved.spec
        for i, (mspec, bound) in enumerate(zip(spec.members, resolved.members)):
            if mspec.predictions is not None:
                with _located(resolved, ("members", i, "predictions")):
                    checked.origins[i], checked.predictions[i] = read_member_predictions(resolved, i, checked)
            if bound is None:
                continue
            checked.inputs[i], checked.pretrained[i] = _network_input(resolved, ("members", i), bound, mspec, checked)
            if mspec.weights is not None:
                with _located(resolved, ("members", i, "weights"), plugin=plugin_code(bound, "member", mspec.name)):
                    checked.origins[i] = check_member_weights(resolved, i, checked)
        if any(m.zoo is not None for m in spec.members):
            checked.references, checked.fingerprint = resolve_references(resolved, registry, dataset, indices)
        check_fusers(resolved, checked)
        for j, (sspec, bound) in enumerate(zip(spec.students, resolved.students)):
            checked.student_inputs[j], checked.student_pretrained[j] = _network_input(
                resolved, ("students", j), bound, sspec, checked)
            augment = sspec.train.augment
            if augment.mixup > 0 or augment.cutmix > 0:  # its teacher's targets are for whole images, not mixed pairs
                raise SpecError(f"student {sspec.name}: mixup and cutmix cannot be used with distillation (its teacher's "
                                f"probabilities are for unmixed images); set them to 0",
                                file=resolved.file, loc=("students", j, "train", "augment",
                                                         "mixup" if augment.mixup > 0 else "cutmix"))
        if spec.students:
            check_teachers(resolved, checked, registry)
    return checked


def check_fusers(resolved: ResolvedSpec, checked: Preflight) -> None:
    """Each fuser can be made with its parameters, and they suit its number of members
    (:meth:`Fuser.check_members`: ``mean``'s ``weights``, one per member); a fuser that needs its
    members' inference costs (a cascade) has them: a member read from predictions made elsewhere
    has none unless the spec gives its ``infer_ms_per_image``."""
    from .fusion import make_fuser

    spec = resolved.spec
    index = {m.name: i for i, m in enumerate(spec.members)}
    for j, (fspec, bound) in enumerate(resolved.bound_fusers):
        n_members = len(fspec.members or spec.members)
        with _located(resolved, ("fusers", j, "params"), plugin=plugin_code(bound, "fuser", fspec.name)):
            fuser = make_fuser(fspec, bound, seed=spec.seed)
            try:
                fuser.check_members(n_members)
            except ValueError as exc:  # the fuser's own word on its parameters
                raise FusionEngineError(f"fuser {fspec.name} ({fspec.fuser}) with {n_members} members: "
                                        f"{first_line(exc)}") from None
        if not fuser.needs_costs:
            continue
        for name in fspec.members or [m.name for m in spec.members]:
            i = index[name]
            mspec, ref = spec.members[i], checked.references.get(i)
            unmeasured = mspec.predictions is not None or (ref is not None and ref.n_params is None)
            if unmeasured and mspec.infer_ms_per_image is None:
                raise SpecError(f"fuser {fspec.name} ({fspec.fuser}) needs each member's inference cost, and member "
                                f"{name} has none (its predictions were made elsewhere): give that member "
                                f"infer_ms_per_image", file=resolved.file, loc=("fusers", j, "fuser"))


def _network_input(resolved: ResolvedSpec, loc: tuple, bound, network, checked: Preflight):
    """A member's or student's input config and pretrained weights' identity, its backbone's own
    check and its augmentation settings against that input, reported at ``loc``."""
    spec = resolved.spec
    pretrained = None
    with _located(resolved, (*loc, "params"), plugin=plugin_code(bound, loc[0].rstrip("s"), network.name)):
        cfg = member_input(bound, num_classes=checked.num_classes, data_spec=spec.data,
                           seed=spec.seed if network.seed is None else network.seed, train=network.train)
        if bound.record.check is not None:
            bound.record.check(bound.params, num_classes=checked.num_classes, image_size=cfg.size)
        if bound.record.weights is not None:
            pretrained = bound.record.weights(bound.params)
    if network.train is not None:
        try:
            check_augment(network.train.augment, cfg)
        except AugmentError as exc:
            raise SpecError(str(exc), file=resolved.file, loc=(*loc, "train", "augment", exc.field)) from None
    return cfg, pretrained


def check_teachers(resolved: ResolvedSpec, checked: Preflight, registry: Path | None) -> None:
    """Every member a student's teacher uses can have outputs on train: one read from predictions
    has train rows in its file, one named by ``zoo:`` was stored with them (a member the spec
    trains or runs from weights predicts train in the run)."""
    from .zoo import Registry, resolve_registry
    from .zoo.artifacts import output_splits

    spec = resolved.spec
    for i, mspec in enumerate(spec.members):
        taught = [j for j, s in enumerate(spec.students) if mspec.name in spec.teacher_members(s)]
        if not taught:
            continue
        j = taught[0]
        problem = None
        if i in checked.predictions and "train" not in checked.predictions[i]:
            problem = (f"member {mspec.name}'s predictions file {checked.origins[i].path.name} has no rows for the "
                       f"train split, which the teacher '{spec.students[j].teacher}' needs to teach")
        elif i in checked.references:
            entry = checked.references[i]
            with Registry(resolve_registry(registry), create=False) as reg:
                folder = reg.member_dir(entry.key)
            if "train" not in output_splits(folder):
                problem = (f"member {mspec.name} (zoo: {mspec.zoo}) was stored without outputs on train, which the "
                           f"teacher '{spec.students[j].teacher}' needs to teach; list it by its backbone in this "
                           f"spec (the zoo reuses it and predicts train once)")
        if problem:
            raise SpecError(f"student {spec.students[j].name}: {problem}", file=resolved.file,
                            loc=("students", j, "teacher"))


def member_input(bound, *, num_classes: int, data_spec, seed: int, train=None) -> InputConfig:
    """What a member's network takes, with the spec's ``data.mean``/``data.std`` applied, and
    how its images are prepared for evaluation: the backbone's resize and crop on the timm
    pipeline, a plain resize to a square on the batch pipeline (:mod:`fusion_engine.augment`).

    Read from the backbone record's ``input_config`` when it has one; otherwise the network is
    built to ask it, on the meta device where the plugin allows (:func:`network_shapes`).
    """
    from .augment import resolve_pipeline
    from .spec import TrainSpec

    record = bound.record
    if record.input_config is not None:
        cfg = record.input_config(bound.params, image_size=data_spec.image_size)
    else:
        cfg = network_shapes(record, bound.params, num_classes=num_classes, image_size=data_spec.image_size,
                             seed=seed).input
    mean = tuple(data_spec.mean) if data_spec.mean is not None else tuple(cfg.mean)
    std = tuple(data_spec.std) if data_spec.std is not None else tuple(cfg.std)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != cfg.in_chans:
            raise FusionEngineError(f"data.{label} has {len(values)} values but the backbone takes {cfg.in_chans} "
                                    f"channels; give {cfg.in_chans}")
    size = data_spec.image_size or cfg.size
    if resolve_pipeline((train or TrainSpec()).augment, size) == "batch":
        return InputConfig(size=size, mean=mean, std=std, in_chans=cfg.in_chans)
    return InputConfig(size=size, mean=mean, std=std, in_chans=cfg.in_chans, interpolation=cfg.interpolation,
                       crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)


def member_file(resolved: ResolvedSpec, path: Path, allowed: tuple[str, ...]) -> Path:
    """A file a member names, relative to the spec's folder: it must exist and have an allowed suffix."""
    path = (resolved.base_dir / Path(path).expanduser()).resolve()
    if path.suffix.lower() not in allowed:
        raise FusionEngineError(f"'{path.name}' is not one of {', '.join(allowed)}")
    if not path.is_file():
        raise FusionEngineError(f"no such file: {path}")
    return path


def network_shapes(record, params, *, num_classes: int, image_size: int | None, seed: int):
    """A backbone's network as the driver needs it, for its shapes and input config only: built
    on the meta device (nothing allocated or initialised), or for real when the plugin's build
    cannot run there (it reads a file, say). The driver trains nothing it builds here."""
    import warnings

    import torch

    from .executors import build_network

    try:
        with torch.device("meta"), warnings.catch_warnings():
            # weights a build loads are not copied onto meta tensors, which torch says once a tensor
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            return build_network(record, params, num_classes=num_classes, image_size=image_size, seed=seed)
    except FusionEngineError:
        raise  # the plugin refused its params: building it for real would say the same, again
    except Exception:
        return build_network(record, params, num_classes=num_classes, image_size=image_size, seed=seed)


def check_member_weights(resolved: ResolvedSpec, i: int, checked: Preflight) -> Origin:
    """A member run from its weights: the file fits the network the member's backbone builds
    for the classes it was trained on, and those classes are the dataset's."""
    from .provenance import file_sha256
    from .weights import WEIGHT_SUFFIXES, class_order, file_class_names, read_weight_shapes, weights_mismatch

    mspec, bound = resolved.spec.members[i], resolved.members[i]
    path = member_file(resolved, mspec.weights, WEIGHT_SUFFIXES)
    names = mspec.class_names or file_class_names(path)
    order = class_order(names, checked.dataset.class_names, what=f"weights {path}")
    shapes = read_weight_shapes(path)
    built = network_shapes(bound.record, bound.params, num_classes=checked.num_classes,
                           image_size=resolved.spec.data.image_size, seed=0)
    expected = {k: tuple(v.shape) for k, v in built.module.state_dict().items()}
    problems = weights_mismatch(expected, shapes)
    if problems:
        hint = ("; its classifier is sized for another number of classes? the dataset has "
                f"{checked.num_classes}" if any("mis-shaped" in p for p in problems.split("; ")) else "")
        raise FusionEngineError(f"weights {path} do not fit the {bound.record.name} network this member builds: "
                                f"{problems}{hint}")
    return Origin(path, file_sha256(path), names, order.tolist())


def read_member_predictions(resolved: ResolvedSpec, i: int, checked: Preflight) -> tuple[Origin, dict]:
    """A member read from a predictions file: the whole file, checked, as logits per split."""
    import hashlib

    from .predictions import SUFFIXES, read_predictions
    from .weights import class_order

    mspec = resolved.spec.members[i]
    path = member_file(resolved, mspec.predictions, SUFFIXES)
    try:
        data = path.read_bytes()  # read once: the bytes hashed are the bytes read
    except OSError as exc:
        raise FusionEngineError(f"cannot read predictions file {path}: {exc.strerror or exc}") from None
    logits, names = read_predictions(path, kind=mspec.kind, class_names=mspec.class_names,
                                     dataset_classes=checked.dataset.class_names, ids=checked.ids, data=data)
    order = class_order(names, checked.dataset.class_names, what=str(path)).tolist()
    return Origin(path, hashlib.sha256(data).hexdigest(), names, order), logits


def check_retrain(resolved: ResolvedSpec, retrain: tuple[str, ...]) -> None:
    """``--retrain`` names members (or students) the spec trains, or is ``all``."""
    trainable = [*(m.name for m in resolved.spec.members if m.zoo is None), *(s.name for s in resolved.spec.students)]
    for name in retrain:
        if name == "all":
            continue
        if name not in trainable:
            taken = [m.name for m in resolved.spec.members if m.zoo is not None]
            why = (f"'{name}' is taken from the zoo as it is" if name in taken
                   else f"no member of {resolved.spec.name} is called '{name}'")
            raise FusionEngineError(f"--retrain: {why}; members it trains: {', '.join(trainable) or 'none'}")


def resolve_references(resolved: ResolvedSpec, registry: Path | None, dataset: ImageDataset,
                       indices: dict[str, np.ndarray]) -> tuple[dict[int, object], str | None]:
    """The zoo entry each ``zoo:`` member names, checked to have been trained on this data, and
    the dataset's fingerprint if that needed it."""
    from .data import dataset_fingerprint
    from .zoo import Registry, resolve_registry, split_digest
    from .zoo.store import choose_reference

    registry = resolve_registry(registry)
    split = split_digest({s: [str(dataset.ids[i]) for i in idx] for s, idx in indices.items()})
    fingerprint: list[str] = []  # computed at most once, when needed

    def data_fingerprint() -> str:
        if not fingerprint:
            fingerprint.append(dataset_fingerprint(dataset))
        return fingerprint[0]

    chosen = {}
    with Registry(registry, create=False) as reg:
        for i, mspec in enumerate(resolved.spec.members):
            if mspec.zoo is None:
                continue
            try:
                chosen[i] = choose_reference(reg, mspec.zoo, fingerprint=data_fingerprint, split=split)
            except FusionEngineError as exc:
                raise SpecError(str(exc), file=resolved.file, loc=("members", i, "zoo")) from None
    return chosen, (fingerprint[0] if fingerprint else None)


def _located(resolved: ResolvedSpec, loc: tuple, *, plugin: str | None = None):
    """A problem found inside the block, reported at ``loc`` of the spec (:func:`located`)."""
    return located(resolved.file, loc, plugin=plugin)
