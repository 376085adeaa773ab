"""Executors: what trains and predicts the members a run does not find in the zoo.

The run (:mod:`fusion_engine.runner`) decides which members to train, holds their zoo locks and
stores what comes back; an executor only turns each :class:`MemberJob` into a
:class:`FittedMember` with :func:`fit_member`, wherever it runs it. Executors are plugins
(``register_executors``): ``local`` runs the jobs one after another in this process (resuming
checkpoints, with progress bars); ``ray`` (``pip install 'fusion-engine[ray]'``) runs them as Ray
tasks on a cluster, side by side, each with its own resource request.

A job that fails comes back as a :class:`JobOutcome` with its ``error`` set; the other jobs go
on, and the run reports every failed member at the end. Members that finished are stored in the
zoo either way, so a re-run trains only the ones that failed.
"""

from __future__ import annotations

import platform
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import FusionEngineError, UnreadableImage
from .records import SCORED_SPLITS, BackboneRecord, InputConfig, Params

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .checkpoint import Checkpoint
    from .imagesets import ImageSet
    from .resolve import Bound
    from .spec import ResourcesSpec, TrainSpec

#: what an executor is given to find a job's images: the train/val/test image sets at an input config
#: (:class:`fusion_engine.imagesets.ImageSet`: opened when first read, and, pickled to another
#: process, what reopens them there rather than their pixels)
Pixels = Callable[[InputConfig], "dict[str, ImageSet]"]


@dataclass
class MemberJob:
    """One member to train on train, select on val, and predict on val and test; or, with
    ``train`` None, a member trained elsewhere whose ``weights`` file is loaded (its outputs put
    in the dataset's class order by ``class_order``) and which only predicts.

    Everything a worker needs travels in the job, except the images and labels, which an
    executor gets once per run and shares between jobs (the ``ray`` executor puts what opens the
    images in the object store once). ``checkpoint`` is the zoo's per-epoch checkpoint on this machine; an
    executor that runs jobs elsewhere leaves it out, and the job starts from epoch 1.
    """

    name: str
    key: str
    backbone: BackboneRecord
    params: Params
    train: "TrainSpec | None"
    seed: int
    num_classes: int
    image_size: int | None
    input: InputConfig
    device: str = "auto"
    resources: "ResourcesSpec | None" = None
    label: str = ""  # "member 2/3", for progress lines
    #: its position in the spec's ``members`` (or ``students``); of members that share a key (and so
    #: one job), the first one's
    index: int = 0
    checkpoint: "Checkpoint | None" = None
    pretrained: dict | None = None  # the identity of its pretrained weights from a hub, as its key has it
    weights: "Path | None" = None  # a member that is not trained: its weights file
    weights_sha256: "str | None" = None  # the bytes of that file the run checked (and keyed the member by)
    #: the splits it predicts: val and test, and train too for a member a student's teacher uses
    splits: tuple[str, ...] = SCORED_SPLITS
    #: a student's: its teacher's probabilities on train ``(N, C)``, and how to distil them (a DistillSpec)
    soft_targets: "np.ndarray | None" = None
    distill: Any = None
    class_order: "list[int] | None" = None  # columns of its outputs in the dataset's class order

    @property
    def eval_batch_size(self) -> int:
        return self.train.eval_batch_size if self.train is not None else EVAL_BATCH_SIZE


#: the prediction batch of a member that is not trained (a trained one's is its train.eval_batch_size)
EVAL_BATCH_SIZE = 256


@dataclass
class FittedMember:
    """What :func:`fit_member` returns: the best epoch's weights and the member's outputs
    (a member run from its weights has no history and no best epoch)."""

    state_dict: dict[str, Any]  # name -> CPU tensor
    logits: dict[str, "np.ndarray"]  # "val", "test" -> (N, C) float32
    history: list[dict]
    best_epoch: int | None
    train_seconds: float
    predict_seconds: float
    images_per_second: float
    n_params: int
    device: str
    resumed_from_epoch: int = 0
    host: str = field(default_factory=platform.node)
    pipeline: str | None = "batch"  # the augmentation pipeline it trained with (None: not trained here)


@dataclass
class JobOutcome:
    """A finished job: ``result`` when it succeeded, else ``error`` (one line) and ``traceback``."""

    job: MemberJob | None
    result: FittedMember | None = None
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, job: MemberJob | None, exc: BaseException, seconds: float = 0.0) -> "JobOutcome":
        """The outcome of a job that raised ``exc`` (or that could not be made: ``job`` None): its
        message on one line, and the traceback."""
        message = " ".join(str(exc).split())
        if not isinstance(exc, FusionEngineError):
            message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return cls(job, error=message, traceback="".join(traceback.format_exception(exc)), seconds=seconds)


class Executor:
    """Runs member jobs. Subclasses implement :meth:`run`; :meth:`close` frees what they hold."""

    name = "executor"
    #: True when jobs run in this process and may use its checkpoint folder and progress bars
    in_process = False

    def run(self, jobs: list[MemberJob], pixels: Pixels, labels: dict[str, "np.ndarray"], *,
            quiet: bool = False, console=None) -> Iterator[JobOutcome]:
        """Yield one :class:`JobOutcome` per job, in the order they finish. ``pixels(cfg)`` gives
        the image sets at a job's input config; ``labels`` the ``train`` and ``val`` labels."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """The default: every job in this process, one after another, on the run's device; a job
    resumes from its checkpoint. Needs nothing installed."""

    name = "local"
    in_process = True

    def run(self, jobs, pixels, labels, *, quiet=False, console=None):
        for job in jobs:
            images = pixels(job.input)
            t0 = time.perf_counter()
            try:
                result = fit_member(job, images, labels, quiet=quiet, checkpoint=job.checkpoint)
            except UnreadableImage:  # bad data fails the run, not the member (every member would meet it)
                raise
            except Exception as exc:  # the member fails alone; KeyboardInterrupt stops the run
                yield JobOutcome.failure(job, exc, time.perf_counter() - t0)
            else:
                yield JobOutcome(job, result=result, seconds=time.perf_counter() - t0)


def build_network(record: BackboneRecord, params: Params, *, num_classes: int, image_size: int | None, seed: int):
    """A backbone's network, freshly initialised from ``seed`` (the same weights on every machine)."""
    import torch

    torch.manual_seed(seed)
    return record.build(params, num_classes=num_classes, image_size=image_size)


def build_member(job: MemberJob):
    """The job's network (:func:`build_network`)."""
    return build_network(job.backbone, job.params, num_classes=job.num_classes, image_size=job.image_size,
                         seed=job.seed)


def fit_member(job: MemberJob, images: dict[str, "ImageSet | torch.Tensor"], labels: dict[str, "np.ndarray"], *,
               quiet: bool = True, checkpoint: "Checkpoint | None" = None) -> FittedMember:
    """Build, train and predict one member: the whole of a member's compute, run by executors.
    A member that is not trained (``job.train`` None) is built, given its weights and predicts.

    ``images`` holds the ``train``, ``val`` and ``test`` image sets at ``job.input`` (or ``uint8``
    tensors); ``labels`` the ``train`` and ``val`` labels. Deterministic on CPU for a given job.
    """
    import torch

    from .training import resolve_device, train_member

    check_weights(job)
    built = build_member(job)
    if job.train is None:
        return _predict_from_weights(job, built, images)
    y = {s: torch.tensor(labels[s]) for s in ("train", "val")}
    soft = torch.from_numpy(job.soft_targets) if job.soft_targets is not None else None
    result = train_member(
        built.module, job.input, job.train, images["train"], y["train"], images["val"], y["val"],
        seed=job.seed, device=job.device, label=job.name, quiet=quiet, checkpoint=checkpoint,
        num_classes=job.num_classes, soft_targets=soft, distill=job.distill,
    )  # leaves the module holding the best epoch's weights
    logits, predict_seconds = _predict(job, built.module, images)
    return FittedMember(
        state_dict=result.state_dict, logits=logits, history=result.history, best_epoch=result.best_epoch,
        train_seconds=result.train_seconds, predict_seconds=predict_seconds,
        images_per_second=result.images_per_second, n_params=sum(p.numel() for p in built.module.parameters()),
        device=str(resolve_device(job.device)), resumed_from_epoch=result.resumed_from_epoch,
        pipeline=result.pipeline,
    )


def check_weights(job: MemberJob) -> None:
    """The pretrained weights this machine would load are the ones the member's key names (a
    Ray worker's Hugging Face cache may hold another revision than the driver's)."""
    if job.pretrained is None or job.backbone.weights is None:
        return
    found = job.backbone.weights(job.params)
    if found != job.pretrained:
        raise FusionEngineError(
            f"member {job.name}: the pretrained weights here ({_describe(found)}) are not the ones its zoo key names "
            f"({_describe(job.pretrained)}); give every machine the same Hugging Face cache")


def _describe(weights: dict | None) -> str:
    if not weights:
        return "none"
    return f"{weights.get('repo', '?')}@{str(weights.get('revision', '?'))[:12]}/{weights.get('file', '?')}"


def _predict_from_weights(job: MemberJob, built, images: dict) -> FittedMember:
    """A member trained elsewhere: its weights loaded as they are (the classifier kept), its
    val and test outputs predicted and put in the dataset's class order."""
    import numpy as np

    from .training import resolve_device
    from .weights import read_state_dict, weights_mismatch

    state = read_state_dict(job.weights, sha256=job.weights_sha256)
    expected = {k: tuple(v.shape) for k, v in built.module.state_dict().items()}
    problems = weights_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise FusionEngineError(f"weights {job.weights} do not fit member {job.name}'s network: {problems}")
    built.module.load_state_dict({**{k: v for k, v in built.module.state_dict().items()
                                     if k.endswith("num_batches_tracked")}, **state})
    logits, predict_seconds = _predict(job, built.module, images)
    if job.class_order is not None:
        logits = {s: np.ascontiguousarray(v[:, job.class_order]) for s, v in logits.items()}
    n_images = sum(len(images[s]) for s in SCORED_SPLITS)
    return FittedMember(
        state_dict={k: v.detach().to("cpu") for k, v in built.module.state_dict().items()}, logits=logits,
        history=[], best_epoch=None, train_seconds=0.0, predict_seconds=predict_seconds,
        images_per_second=n_images / predict_seconds if predict_seconds else 0.0,
        n_params=sum(p.numel() for p in built.module.parameters()), device=str(resolve_device(job.device)),
        pipeline=None,
    )


def _predict(job: MemberJob, module, images: dict) -> tuple[dict, float]:
    """The module's logits on ``job.splits``, and the seconds its val and test predictions took
    (a member's inference cost is measured on the samples every member predicts)."""
    from .training import predict_logits

    logits, seconds = {}, 0.0
    for s in job.splits:
        t0 = time.perf_counter()
        logits[s] = predict_logits(module, job.input, images[s], batch_size=job.eval_batch_size, device=job.device)
        if s in SCORED_SPLITS:
            seconds += time.perf_counter() - t0
    return logits, seconds


class LazyExecutor:
    """The spec's executor, made from its plugin (the built-in local one when the spec names
    none) when a member first needs training: a run whose members are all in the zoo never
    starts or reaches a Ray cluster."""

    def __init__(self, bound: "Bound | None"):
        self.bound = bound
        self.name = bound.record.name if bound is not None else "local"
        self._made: Executor | None = None

    @property
    def local(self) -> bool:
        return self.name == "local"

    def get(self) -> Executor:
        if self._made is None:
            made = LocalExecutor() if self.bound is None else self.bound.record.create(self.bound.params)
            if not isinstance(made, Executor):
                raise FusionEngineError(f"executor plugin {self.bound.provided.plugin} made {type(made).__name__}, "
                                        f"expected a fusion_engine.Executor")
            self._made = made
        return self._made

    def close(self) -> None:
        if self._made is not None:
            made, self._made = self._made, None
            made.close()

    def __enter__(self) -> "LazyExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
