"""Everything about a spec that can be known without training, checked before anything runs.

``fusion-engine validate`` and ``fusion-engine run`` both call :func:`preflight`; ``run`` calls
it before it makes a run folder, so bad input never leaves a failed run in the registry. It
checks, beyond the spec's fields and plugin names (:func:`fusion_engine.spec.prepare`):

- the data: the dataset plugin lists and checks its samples (missing or empty class folders, a
  manifest's columns, missing image files, empty labels; nothing is decoded), two classes at
  least, and a split that can be made (enough samples per class);
- each member to train: its network's input config (``data.mean``/``data.std`` of the right
  length), whatever its backbone plugin checks without training (``BackboneRecord.check``:
  for timm, the architecture's name, a ``pretrained_file``'s checksum and its tensors' names
  and shapes against the architecture, a feature map that small images shrink to nothing), its
  pretrained weights found (``BackboneRecord.weights``: timm's in the Hugging Face cache), and
  augmentation settings its pipeline uses (and a timm transform that builds);
- each ``zoo:`` member: one stored member matches it (several are told apart by the data they
  were trained on);
- ``--retrain`` names members of the spec.

Warnings (skipped files, a collapsing feature map, an ignored ``data.split``) are logged as
they are found and kept, so that the run can record them in ``run.log`` and ``run.json``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .augment import AugmentError, check_augment
from .errors import FusionEngineError, SpecError
from .records import ImageDataset, InputConfig
from .spec import ResolvedSpec

log = logging.getLogger("fusion_engine")


@dataclass
class Preflight:
    """What the checks found: the loaded and split dataset, each trained member's input config
    (by spec index), the zoo entry each ``zoo:`` member names (by spec index), and the warnings."""

    dataset: ImageDataset
    indices: dict[str, np.ndarray]
    fingerprint: str | None = None  # the dataset's, when a check needed it
    inputs: dict[int, InputConfig] = field(default_factory=dict)
    weights: dict[int, dict] = field(default_factory=dict)  # spec index -> pretrained weights' identity
    references: dict[int, object] = field(default_factory=dict)  # spec index -> ZooEntry
    warnings: list[logging.LogRecord] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.class_names)


def preflight(resolved: ResolvedSpec, *, registry: Path | None = None, retrain: tuple[str, ...] = ()) -> Preflight:
    """Check ``resolved`` (see the module docstring); the first problem raises, one line, naming it.

    ``registry`` is where ``zoo:`` members are looked up; ``retrain`` the members a run is asked
    to train again (``all`` for every one).
    """
    from .data import load_dataset

    with _kept_warnings() as kept:
        check_retrain(resolved, retrain)
        dataset, indices = load_dataset(resolved)
        checked = Preflight(dataset, indices, warnings=kept)
        spec = resolved.spec
        for i, (mspec, bound) in enumerate(zip(spec.members, resolved.members)):
            if bound is None:
                continue
            loc = ("members", i, "params")
            try:
                checked.inputs[i] = member_input(bound, num_classes=checked.num_classes, data_spec=spec.data,
                                                 seed=spec.seed if mspec.seed is None else mspec.seed,
                                                 train=mspec.train)
                if bound.record.check is not None:
                    bound.record.check(bound.params, num_classes=checked.num_classes,
                                       image_size=checked.inputs[i].size)
                if bound.record.weights is not None:
                    checked.weights[i] = bound.record.weights(bound.params)
            except SpecError:
                raise
            except FusionEngineError as exc:
                raise SpecError(str(exc), file=resolved.file, loc=loc) from None
            try:
                check_augment(mspec.train.augment, checked.inputs[i])
            except AugmentError as exc:
                raise SpecError(str(exc), file=resolved.file, loc=("members", i, "train", "augment", exc.field)) from None
        if any(m.zoo is not None for m in spec.members):
            checked.references, checked.fingerprint = resolve_references(resolved, registry, dataset, indices)
    return checked


def member_input(bound, *, num_classes: int, data_spec, seed: int, train=None) -> InputConfig:
    """What a member's network takes, with the spec's ``data.mean``/``data.std`` applied, and
    how its images are prepared for evaluation: the backbone's resize and crop on the timm
    pipeline, a plain resize to a square on the batch pipeline (:mod:`fusion_engine.augment`).

    Read from the backbone record's ``input_config`` when it has one; otherwise the network is
    built once to ask it.
    """
    from .augment import resolve_pipeline
    from .executors import build_network
    from .spec import TrainSpec

    record = bound.record
    if record.input_config is not None:
        cfg = record.input_config(bound.params, image_size=data_spec.image_size)
    else:
        cfg = build_network(record, bound.params, num_classes=num_classes, image_size=data_spec.image_size,
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


def check_retrain(resolved: ResolvedSpec, retrain: tuple[str, ...]) -> None:
    """``--retrain`` names members the spec trains (or is ``all``)."""
    trainable = [m.name for m in resolved.spec.members if m.zoo is None]
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


@contextmanager
def _kept_warnings() -> Iterator[list[logging.LogRecord]]:
    """The warnings logged inside the block, kept (they are still logged as usual)."""
    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    handler = Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        yield kept
    finally:
        log.removeHandler(handler)
