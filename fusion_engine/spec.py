"""The experiment spec: its pydantic models, each field with its default, bounds and meaning.

A spec file is read by :mod:`fusion_engine.specfile` (YAML or TOML, errors as
``FILE: path.to.field: message``) and its plugin names bound by :mod:`fusion_engine.resolve`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, StrictBool, field_serializer, field_validator, model_validator

from .records import StrictModel

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
#: seeds are NumPy's and scikit-learn's: 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1


class _Strict(StrictModel):
    model_config = ConfigDict(extra="forbid")


class SplitSpec(_Strict):
    """Fractions of the dataset held out for validation and test (stratified, seeded)."""

    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_train(self) -> "SplitSpec":
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves too little to train on; keep it below 0.9")
        return self


class DataSpec(_Strict):
    dataset: str
    params: dict[str, Any] = Field(default_factory=dict)
    image_size: Optional[int] = Field(None, ge=8, le=1024, description="square input size; default: the backbone's")
    mean: Optional[tuple[float, ...]] = Field(None, description="normalisation mean; default: the backbone's")
    std: Optional[tuple[float, ...]] = Field(None, description="normalisation std; default: the backbone's")
    split: SplitSpec = Field(default_factory=SplitSpec)
    memory_budget: Optional[Union[float, str]] = Field(
        None, description="decoded images held in memory at most: a fraction of the available memory (0.5) or a "
                          "size ('8GB'); default 0.5. Larger data is read from the decoded cache on disk or decoded "
                          "per batch")
    storage: Literal["auto", "memory", "disk", "stream"] = Field(
        "auto", description="where decoded images live: auto (memory if they fit the budget, else disk or stream, "
                            "whichever measures faster), memory, disk (the decoded-image cache) or stream (decoded "
                            "per batch)")
    workers: Optional[int] = Field(None, ge=0, le=256, description="DataLoader worker processes that decode and "
                                   "augment images; default: one per core, at most 8; 0: in the run's process")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v):
        from .memory import parse_budget

        parse_budget(v)  # raises ValueError saying what is allowed
        return v


class AugmentSpec(_Strict):
    """Training augmentation. ``pipeline`` picks how (see docs/spec.md); the other fields are
    each used by one pipeline or both, as their descriptions say."""

    pipeline: Literal["auto", "batch", "timm"] = Field(
        "auto", description="batch: shifts and flips of whole batches on the device (small images); timm: timm's "
                            "per-image transforms in worker processes (photos); auto: batch up to 64 px, timm above")
    shift: float = Field(0.125, ge=0, le=0.5, description="batch: max random translation, as a fraction of the size")
    hflip: Optional[bool] = Field(None, description="random horizontal flips; default: off for batch (digits are not "
                                                    "flip-invariant), on for timm")
    scale: tuple[float, float] = Field((0.08, 1.0), description="timm: random-resized-crop area range")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="timm: random-resized-crop aspect-ratio range")
    auto_augment: Optional[str] = Field(
        None, description="timm: rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, original (AutoAugment) or "
                          "trivialaugment (TrivialAugmentWide)")
    color_jitter: Optional[float] = Field(0.4, ge=0, description="timm: colour jitter strength (off with auto_augment)")
    interpolation: Optional[Literal["bilinear", "bicubic", "random"]] = Field(
        None, description="timm: resampling of the random crops; default: the backbone's")
    re_prob: float = Field(0.0, ge=0, le=1, description="both: random-erasing probability (on the device)")
    mixup: float = Field(0.0, ge=0, description="both: mixup alpha (0: off)")
    cutmix: float = Field(0.0, ge=0, description="both: cutmix alpha (0: off)")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="both: probability a batch is mixed when mixup or cutmix is on")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="both: probability of cutmix over mixup when both are on")

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, v, info):
        low, high = v
        if not 0 < low <= high or (info.field_name == "scale" and high > 1):
            allowed = "0 < low <= high <= 1" if info.field_name == "scale" else "0 < low <= high"
            raise ValueError(f"expected [low, high] with {allowed}")
        return v


class TrainSpec(_Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: Optional[float] = Field(None, gt=0, description="default: 2e-3 for adamw, 0.05 for sgd")
    weight_decay: Optional[float] = Field(None, ge=0, description="default: 0.05 for adamw, 5e-4 for sgd")
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    patience: Optional[int] = Field(None, ge=1, description="stop after this many epochs without a better val loss")
    eval_batch_size: int = Field(256, ge=1)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-3 if self.optimizer == "adamw" else 0.05)

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.optimizer == "adamw" else 5e-4


class ResourcesSpec(_Strict):
    """What one member's training asks of an executor that schedules (``ray``); ``local`` runs
    members one after another in its own process and ignores it."""

    cpus: float = Field(1.0, gt=0, description="CPU cores for the member's task")
    gpus: float = Field(0.0, ge=0, description="GPUs for the member's task (fractions share one)")


class ExecutorSpec(_Strict):
    name: str = Field("local", description="a registered executor: local (in this process) or ray")
    params: dict[str, Any] = Field(default_factory=dict, description="the executor's own parameters")

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class MemberSpec(_Strict):
    """One member, from exactly one source:

    - ``backbone``: a network the engine trains (``train``), or, with ``train: false`` and
      ``weights: FILE``, one trained elsewhere that the engine only runs on val and test;
    - ``predictions: FILE``: outputs computed elsewhere, read as they are (``kind`` says whether
      they are logits or probabilities);
    - ``zoo``: a member already in the zoo.

    ``class_names`` gives the order of a weights file's or a predictions file's outputs when it
    is not the dataset's (by default ``classes.txt`` or ``classes.json`` beside the file).
    """

    name: str = Field(pattern=SAFE_NAME)
    backbone: Optional[str] = Field(None, description="a registered backbone to train, or to run with weights")
    params: dict[str, Any] = Field(default_factory=dict)
    train: Optional[TrainSpec] = Field(
        default_factory=TrainSpec, description="how to train it; false: not trained, its weights: are used as they are")
    weights: Optional[Path] = Field(None, description="with train: false, the member's trained weights (.safetensors, "
                                                      "or .pth/.pt/.bin read with weights_only); relative to the spec")
    predictions: Optional[Path] = Field(None, description="outputs made elsewhere: a CSV, Parquet, .npz or .safetensors "
                                                          "file with a row per sample id; relative to the spec")
    kind: Optional[Literal["logits", "probabilities"]] = Field(None, description="what a predictions: file holds")
    class_names: Optional[list[str]] = Field(None, min_length=2, description="the classes of the weights' or "
                                             "predictions' outputs, in their order; default: the dataset's")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="default: the experiment's seed")
    calibrate: Literal["none", "temperature"] = Field(
        "none", description="temperature-scale this member's logits (fitted on val) before fusion")
    infer_ms_per_image: Optional[float] = Field(
        None, gt=0, description="its inference cost in milliseconds per image, for the leaderboard and cost-aware "
                                "fusers (a cascade): replaces the cost measured in the run; needed for a member "
                                "from predictions: when a cascade uses it")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     description="CPUs and GPUs the member's task asks an executor for")
    zoo: Optional[str] = Field(None, pattern=SAFE_NAME,
                               description="reuse a zoo member: its key, a key prefix (8+ hex characters) or its name")

    @field_validator("train", mode="before")
    @classmethod
    def _false_is_not_trained(cls, value: Any) -> Any:
        if value is False:
            return None
        if value is True:
            return {}
        if value is None:
            raise ValueError("give the training settings, or false for a member that is not trained")
        return value

    @field_serializer("train")
    def _not_trained_is_false(self, value: Optional[TrainSpec]):
        return False if value is None else value

    @property
    def source(self) -> str:
        """Where the member's outputs come from: trained, weights, predictions or zoo."""
        if self.zoo is not None:
            return "zoo"
        if self.predictions is not None:
            return "predictions"
        return "weights" if self.train is None else "trained"

    @model_validator(mode="after")
    def _one_source(self) -> "MemberSpec":
        given = [f for f in ("backbone", "predictions", "zoo") if getattr(self, f) is not None]
        if not given:
            raise ValueError("give a backbone (to train, or with train: false and weights: FILE to run), "
                             "predictions: FILE (outputs made elsewhere) or zoo: KEY or NAME (a stored member)")
        if len(given) > 1:
            raise ValueError(f"give one of backbone, predictions and zoo, not {' and '.join(given)}")
        set_fields = self.model_fields_set
        if self.zoo is not None:
            extra = [f for f in ("params", "train", "seed", "weights", "kind", "class_names") if f in set_fields]
            if extra:
                raise ValueError(f"a zoo member comes trained: remove {', '.join(extra)} "
                                 "(its zoo card records how it was made)")
        elif self.predictions is not None:
            extra = [f for f in ("params", "train", "seed", "weights", "resources") if f in set_fields]
            if extra:
                raise ValueError(f"a predictions member is read from its file: remove {', '.join(extra)}")
            if self.kind is None:
                raise LocatedError(("kind",), "say what the predictions file holds: kind: logits or kind: "
                                               "probabilities")
        else:
            if "kind" in set_fields:
                raise LocatedError(("kind",), "kind is for a predictions: file")
            if self.train is None and self.weights is None:
                raise LocatedError(("weights",), "a member with train: false is run as it is: give its weights: FILE")
            if self.weights is not None and self.train is not None:
                raise LocatedError(("train",), "a member with weights: is run as it is, not trained: add train: "
                                                "false (to train from a file, use the backbone's own pretrained "
                                                "weights, e.g. params: {pretrained_file: ...})")
            if self.class_names is not None and self.weights is None:
                raise LocatedError(("class_names",), "class_names is for a weights: or predictions: file")
            if self.train is None and "seed" in set_fields:
                raise LocatedError(("seed",), "a member with train: false is not trained: remove seed")
        return self


class DistillSpec(_Strict):
    """Knowledge distillation (Hinton et al. 2015): the student's loss is ``alpha`` times the
    KL divergence between the teacher's and its own probabilities, both softened by
    ``temperature`` (and scaled by its square, so the soft term's gradients keep their size),
    plus ``1 - alpha`` times the usual cross-entropy with the labels."""

    alpha: float = Field(0.9, ge=0, le=1, description="the weight of the soft (teacher) loss; 1 - alpha goes to the "
                                                      "labels")
    temperature: float = Field(4.0, gt=0, le=100, description="softens teacher and student alike; 1: no softening")


class StudentSpec(_Strict):
    """One network trained to imitate a teacher (a fuser's or a member's row) on the train split:
    ensemble accuracy at one network's inference cost."""

    name: str = Field(pattern=SAFE_NAME)
    backbone: str = Field(description="a registered backbone, as for a member")
    params: dict[str, Any] = Field(default_factory=dict)
    train: TrainSpec = Field(default_factory=TrainSpec, description="how to train it, as for a member")
    teacher: str = Field(description="the fuser (or member) whose probabilities on train it learns from")
    distill: DistillSpec = Field(default_factory=DistillSpec)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="default: the experiment's seed")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec,
                                     description="CPUs and GPUs the student's task asks an executor for")


class FuserSpec(_Strict):
    name: str = Field(pattern=SAFE_NAME)
    fuser: str
    params: dict[str, Any] = Field(default_factory=dict)
    members: Optional[list[str]] = Field(None, min_length=1, description="default: every member")
    temperature: bool = Field(False, description="temperature-scale the fused output, fitted on val out-of-fold")


class ExperimentSpec(_Strict):
    name: str = Field(pattern=SAFE_NAME)
    seed: int = Field(0, ge=0, le=MAX_SEED, description=f"seeds the split, every member and every fuser; 0 to {MAX_SEED}")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    rank_by: str = Field("accuracy", description="the metric (or delta_vs_best_member) that orders the leaderboard")
    budget_ms: Optional[float] = Field(None, gt=0, description="an inference budget in milliseconds per image: the "
                                       "report names the best row (chosen on val) that fits it")
    plugins: list[str] = Field(default_factory=list, description="plugin .py files, relative to the spec file")
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec, description="what trains the members: local or ray")
    data: DataSpec
    members: list[MemberSpec] = Field(min_length=1)
    fusers: list[FuserSpec] = Field(default_factory=list)
    students: list[StudentSpec] = Field(default_factory=list, description="networks distilled from a fuser or member")
    tracking: dict[str, Union[StrictBool, dict[str, Any]]] = Field(
        default_factory=dict, description="trackers to switch on (mlflow: {params}), or off (mlflow: false)")

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracker_entries(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for name, params in value.items():
            if not isinstance(params, (bool, dict)) and params is not None:
                raise LocatedError((name,), f"give the tracker's params as a mapping, or true or false to "
                                             f"switch it on or off (got {params!r})")  # loc: within tracking
        return {name: True if params is None else params for name, params in value.items()}  # YAML's "mlflow:"

    def teacher_members(self, student: StudentSpec) -> list[str]:
        """The members whose outputs on train ``student``'s teacher needs: the teacher itself when
        it is a member, else the members its fuser combines."""
        for f in self.fusers:
            if f.name == student.teacher:
                return list(f.members or [m.name for m in self.members])
        return [student.teacher]

    @model_validator(mode="after")
    def _names(self) -> "ExperimentSpec":
        seen: dict[str, str] = {}
        for section, items in (("members", self.members), ("fusers", self.fusers), ("students", self.students)):
            for i, item in enumerate(items):
                key = item.name.lower()
                if key in seen:
                    raise LocatedError((section, i, "name"), f"'{item.name}' is already the name of {seen[key]}")
                seen[key] = f"{section}.{i}"
        member_names = {m.name for m in self.members}
        for i, f in enumerate(self.fusers):
            for j, m in enumerate(f.members or ()):
                if m not in member_names:
                    raise LocatedError(("fusers", i, "members", j), f"no member named '{m}'; members: {', '.join(sorted(member_names))}")
        teachers = [*(m.name for m in self.members), *(f.name for f in self.fusers)]
        for i, s in enumerate(self.students):
            if s.teacher not in teachers:
                close = difflib.get_close_matches(s.teacher, teachers, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise LocatedError(("students", i, "teacher"), f"no fuser or member named '{s.teacher}'; {hint}a "
                                                                f"teacher is one of: {', '.join(teachers)}")
        return self


class LocatedError(ValueError):
    """A model-level check that knows which field it is about."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc
