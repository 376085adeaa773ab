"""Training one member and predicting with it: the only code that runs a network.

Images arrive as :class:`~fusion_engine.imagesets.ImageSet` (or ``uint8`` tensors
``(N, C, S, S)``), prepared at the backbone's size and held in memory, on disk or decoded per
batch (:mod:`fusion_engine.stores`). Training takes one of two augmentation pipelines
(:mod:`fusion_engine.augment`): **batch**, for small images held as ``uint8``, indexes each batch
whole and shifts and flips it on the device, so the loop does no per-sample Python work and
costs what a bare PyTorch loop costs; **timm**, for photos, transforms each raw image in
DataLoader worker processes. Both normalise on the device, except that the timm pipeline on the
CPU normalises each image in its worker (in cache, as timm's own loader does). On CPU a run is reproducible: the
same seed gives the same history and weights, whatever the storage and the number of workers.

The loop draws each epoch's order itself and takes its batches as ``(x, target, positions)``:
``positions`` (indices into the train split) is how a per-sample target (soft labels, say) is
gathered for a batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from .augment import shift_flip as augment  # noqa: F401  (the batch pipeline's shifts and flips)
from .errors import FusionEngineError
from .records import InputConfig

log = logging.getLogger("fusion_engine")

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .checkpoint import Checkpoint
    from .imagesets import ImageSet
    from .spec import TrainSpec

# Training images up to this size are copied to a CUDA device once; larger sets stream from
# pinned host memory batch by batch.
DEVICE_RESIDENT_BYTES = 2 << 30


@dataclass
class TrainResult:
    """The best epoch's weights (on CPU) and how training went."""

    state_dict: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from_epoch: int = 0  # the checkpointed epoch training resumed after (0: from the start)
    pipeline: str = "batch"  # the augmentation pipeline it took: batch or timm


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` is CUDA when there is one, else CPU; asking for a missing CUDA is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FusionEngineError(f"unknown device '{device}'; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FusionEngineError("device 'cuda' was asked for but CUDA is not available; use device: auto or cpu")
    if dev.type not in ("cpu", "cuda"):
        raise FusionEngineError(f"unsupported device '{device}'; use auto, cpu or cuda")
    return dev



def train_member(
    module: "torch.nn.Module",
    input_cfg: InputConfig,
    train: "TrainSpec",
    x_train: "ImageSet | torch.Tensor",
    y_train: "torch.Tensor",
    x_val: "ImageSet | torch.Tensor",
    y_val: "torch.Tensor",
    *,
    seed: int,
    device: str = "auto",
    label: str = "",
    quiet: bool = False,
    checkpoint: "Checkpoint | None" = None,
    num_classes: int | None = None,
    soft_targets: "torch.Tensor | None" = None,
    distill: Any = None,
) -> TrainResult:
    """Train ``module``; keep the weights of the epoch with the lowest val loss.

    With ``soft_targets`` (a teacher's probabilities on the train images, ``(N, C)``, row ``i``
    for training image ``i``) the module is a student: its loss is :class:`DistillationLoss`
    with ``distill``'s ``alpha`` and ``temperature``; the epoch is still chosen by the
    cross-entropy on val labels. Each batch takes the rows of its own images, whichever way the
    images are read (memory, the disk cache, decoded in workers).

    The module is left on the device, holding the best weights. ``num_classes`` (default: the
    module's output width) matters only to mixup and cutmix (which a student cannot use).

    With a ``checkpoint`` (an object with ``load() -> (tensors, state) | None`` and
    ``save(tensors, state)``, as :class:`fusion_engine.checkpoint.Checkpoint`), the full training state
    is saved after every epoch (weights, best weights, optimizer, scheduler, RNG states) and
    training resumes after the last saved epoch; on CPU the result equals an uninterrupted run's.
    """
    import torch
    import torch.nn.functional as F

    from .augment import BatchAugment, resolve_pipeline
    from .checkpoint import restore, snapshot
    from .imagesets import ImageSet

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    x_train, x_val = ImageSet.of(x_train, input_cfg), ImageSet.of(x_val, input_cfg)
    n = len(x_train)
    if n == 0 or len(x_val) == 0:
        raise FusionEngineError(f"member {label or '?'}: the train and val splits must not be empty")
    pipeline = resolve_pipeline(train.augment, input_cfg.size)
    if pipeline == "batch":
        _check_images(x_train, input_cfg, "train")
    _check_images(x_val, input_cfg, "val")

    torch.manual_seed(seed)
    if cuda:
        torch.backends.cudnn.benchmark = True
        module.to(dev, memory_format=torch.channels_last)
    else:
        module.to(dev)

    # batches are gathered where the training images are: on the GPU when they fit there
    if cuda and pipeline == "batch" and x_train.storage == "memory" and x_train.nbytes <= DEVICE_RESIDENT_BYTES:
        x_train = x_train.on(dev)
    if cuda and x_val.storage == "memory" and x_val.nbytes <= DEVICE_RESIDENT_BYTES:
        x_val = x_val.on(dev)
    data_dev = x_train.device if pipeline == "batch" else torch.device("cpu")
    y_train = torch.as_tensor(y_train).to(data_dev)
    order_gen = torch.Generator(device=data_dev).manual_seed(seed)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)

    steps_per_epoch = math.ceil(n / min(train.batch_size, n))
    optimizer = _optimizer(module, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(train, steps_per_epoch * train.epochs, round(train.warmup_epochs * steps_per_epoch)))
    criterion = None
    teacher = None
    if soft_targets is not None:  # softened once; each batch takes its images' rows by position
        if len(soft_targets) != n:
            raise FusionEngineError(f"member {label or '?'}: {len(soft_targets)} soft targets for {n} training images")
        if train.augment.mixup > 0 or train.augment.cutmix > 0:
            raise FusionEngineError(f"member {label or '?'}: mixup and cutmix cannot be used with distillation")
        criterion = DistillationLoss(train.label_smoothing, distill.alpha, distill.temperature)
        teacher = criterion.soften(torch.as_tensor(soft_targets).to(torch.float32)).to(data_dev)
    normalise = _Normaliser(input_cfg, dev)
    if (train.augment.mixup > 0 or train.augment.cutmix > 0) and num_classes is None:
        num_classes = _output_width(module, x_val, normalise, dev)
    augmenter = BatchAugment(train.augment, input_cfg, pipeline, normalise, dev, aug_gen, num_classes=num_classes or 0,
                             label_smoothing=train.label_smoothing, seed=seed + 2)
    images = _train_images(x_train, train, input_cfg, pipeline, order_gen, pin=cuda,
                           normalise=None if cuda else normalise)

    def loss_of(logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        """Cross-entropy against class indices (smoothed) or against class probabilities
        (mixup's, with the smoothing already in them); a student's distillation loss against
        its labels and its teacher's softened probabilities."""
        if criterion is not None:
            return criterion(logits, target)
        if target.is_floating_point():
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=train.label_smoothing)

    def batches() -> Iterator[tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]:
        """One epoch of shuffled, augmented, normalised batches on the device, with their positions."""
        positions = torch.tensor_split(torch.randperm(n, generator=order_gen, device=data_dev), steps_per_epoch)
        for idx, xb in zip(positions, images(positions)):
            yb = y_train[idx]
            if xb.device != dev:
                xb = (xb if xb.is_pinned() or not cuda else xb.pin_memory()).to(dev, non_blocking=True)
                yb = yb.to(dev, non_blocking=True)
            x, target = augmenter(xb, yb)
            if teacher is not None:  # the label, then the teacher's row for the same image (DistillationLoss)
                target = torch.cat([target.to(torch.float32)[:, None], teacher[idx].to(dev, non_blocking=True)], dim=1)
            yield x, target, idx

    history: list[dict] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    train_time = 0.0
    images_seen = 0
    started = time.perf_counter()
    resumed_from, elapsed_before = 0, 0.0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        resumed = restore(saved, module, optimizer, scheduler, order_gen, aug_gen, dev)
        resumed_from, elapsed_before = resumed["epoch"], resumed["elapsed"]
        history, best_loss, best_epoch, best_state = resumed["history"], resumed["best_loss"], resumed["best_epoch"], resumed["best_state"]
        train_time, images_seen = resumed["train_time"], resumed["images"]
        if resumed["host_rng"] is not None:
            augmenter.host.load_json(resumed["host_rng"])
    stopped = bool(resumed_from) and train.patience is not None and resumed_from - best_epoch >= train.patience
    last_epoch = resumed_from if stopped else train.epochs
    with _Progress(label, train.epochs, quiet) as progress:
        progress.skip(resumed_from)
        for epoch in range(resumed_from + 1, last_epoch + 1):
            t0 = time.perf_counter()
            module.train()
            progress.start_epoch(steps_per_epoch)
            loss_sum = torch.zeros((), device=dev)
            seen = 0
            for step, (xb, target, _) in enumerate(batches()):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = loss_of(module(xb), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(xb)
                seen += len(xb)
                progress.step(step, lambda: loss_sum.item() / seen)
            train_loss = loss_sum.item() / n
            train_time += time.perf_counter() - t0
            images_seen += n

            val_loss, val_acc = _evaluate(module, x_val, y_val, normalise, train.eval_batch_size, dev)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc,
                            "lr": lr, "seconds": time.perf_counter() - t0})
            if val_loss < best_loss:
                best_loss, best_epoch = val_loss, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            progress.end_epoch(train_loss, val_loss, val_acc)
            if checkpoint is not None:
                checkpoint.save(*snapshot(
                    module, optimizer, scheduler, order_gen, aug_gen, dev, epoch=epoch, history=history,
                    best_loss=best_loss, best_epoch=best_epoch, best_state=best_state, train_time=train_time,
                    images=images_seen, elapsed=elapsed_before + time.perf_counter() - started,
                    host_rng=augmenter.host.to_json() if augmenter.draws_from_host else None))
            if train.patience is not None and epoch - best_epoch >= train.patience:
                break

    if best_state is None:
        raise FusionEngineError(f"member {label or '?'}: the val loss was never finite (training diverged); try a lower lr")
    module.load_state_dict(best_state)
    return TrainResult(
        state_dict=best_state, history=history, best_epoch=best_epoch,
        train_seconds=elapsed_before + time.perf_counter() - started,
        images_per_second=images_seen / train_time if train_time else 0.0, resumed_from_epoch=resumed_from,
        pipeline=pipeline,
    )


def _train_images(x_train: "ImageSet", train: "TrainSpec", cfg: InputConfig, pipeline: str,
                  order_gen: "torch.Generator", *, pin: bool, normalise: "_Normaliser | None" = None):
    """``images(positions) -> iterator of batches``. The batch pipeline reads the prepared
    ``uint8`` images; the timm pipeline transforms each raw image in worker processes, each seeded
    from a seed drawn for it from ``order_gen``, so the number of workers does not change what is
    drawn, and, given ``normalise`` (training on the CPU), normalises it there too: one image at a
    time, while it is in cache, costs less than the whole batch at once in the training process
    (docs/benchmarks.md, "Photos")."""
    import torch

    if pipeline == "batch":
        return x_train.batches
    from .augment import train_transform
    from .loaders import Transformed, worker_batches

    if x_train.items is None:
        raise FusionEngineError("the timm pipeline transforms each raw image, and these training images came as "
                                "pixels only")
    dataset = Transformed(x_train.items, train_transform(train.augment, cfg), cfg.in_chans, normalise)
    n = len(x_train)

    def images(positions):
        seeds = torch.randint(0, 2**62, (n,), generator=order_gen, device=order_gen.device)
        keys = (list(zip(idx.tolist(), seeds[idx].tolist())) for idx in positions)  # made as the workers ask
        return worker_batches(dataset, keys, x_train.workers, pin_memory=pin)

    return images


def _output_width(module, x_val: "ImageSet", normalise, dev) -> int:
    """The number of classes a module predicts, from one forward pass in eval mode."""
    import torch

    training = module.training
    module.eval()
    with torch.inference_mode():
        width = module(normalise(next(iter(x_val.sequential(1))).to(dev))).shape[-1]
    module.train(training)
    return int(width)


class DistillationLoss:
    """Hinton et al. (2015): ``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q)``, where
    ``q_T`` is the student's softmax at temperature ``T`` and ``p_T`` the teacher's
    probabilities softened the same way (:meth:`soften`: ``softmax(log p / T)``). The ``T^2``
    keeps the soft term's gradients the size of the hard term's. Targets are ``(B, 1 + C)``: the
    label, then ``p_T``."""

    def __init__(self, label_smoothing: float, alpha: float, temperature: float):
        self.label_smoothing, self.alpha, self.temperature = label_smoothing, alpha, temperature

    def soften(self, proba: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.softmax(torch.log(proba.clamp_min(1e-12)) / self.temperature, dim=1)

    def __call__(self, logits: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        import torch.nn.functional as F

        logits = logits.float()
        labels, teacher = target[:, 0].long(), target[:, 1:]
        hard = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), teacher, reduction="batchmean") * (t * t)
        return self.alpha * soft + (1.0 - self.alpha) * hard


def predict_logits(
    module: "torch.nn.Module", input_cfg: InputConfig, x: "ImageSet | torch.Tensor", *, batch_size: int,
    device: str = "auto",
) -> "np.ndarray":
    """Logits ``(N, num_classes)`` as float32 for prepared ``uint8`` images, in eval mode.

    Batches of ``batch_size``, halved until they fit whenever the device runs out of memory.
    """
    import torch

    from .imagesets import ImageSet

    dev = resolve_device(device)
    x = ImageSet.of(x, input_cfg)
    _check_images(x, input_cfg, "input")
    module.to(dev)
    if dev.type == "cuda":
        module.to(memory_format=torch.channels_last)
    normalise = _Normaliser(input_cfg, dev)
    out: list = []
    while True:  # the largest batch that fits: halve it when the device runs out of memory
        try:
            for logits in _batch_logits(module, x, normalise, batch_size, dev, start=sum(len(o) for o in out)):
                out.append(logits.cpu())
            break
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of device memory predicting; batch size lowered to %d", batch_size)
    return torch.cat(out).numpy() if out else torch.zeros((0, 0)).numpy()


class _Normaliser:
    """uint8 -> float ``(x / 255 - mean) / std`` on the device, as one multiply-add."""

    def __init__(self, cfg: InputConfig, dev: "torch.device"):
        import torch

        mean = torch.tensor(cfg.mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std
        self.memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        """A batch ``(B, C, S, S)``: ``uint8`` normalised; floats were normalised already (:meth:`image`)."""
        import torch

        if x.is_floating_point():
            return x.contiguous(memory_format=self.memory_format)
        return torch.addcmul(-self.shift, x.float(), self.scale).contiguous(memory_format=self.memory_format)

    def image(self, x: "torch.Tensor") -> "torch.Tensor":
        """One ``uint8`` image ``(C, S, S)`` normalised as :meth:`__call__` normalises a batch."""
        import torch

        return torch.addcmul(-self.shift[0], x.float(), self.scale[0])


def _batch_logits(module, x: "ImageSet", normalise, batch_size: int, dev, start: int = 0) -> Iterator["torch.Tensor"]:
    import torch

    module.eval()
    cuda = dev.type == "cuda"
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
        for xb in x.sequential(batch_size, start):
            if xb.device != dev:
                xb = (xb.pin_memory() if cuda else xb).to(dev, non_blocking=True)
            yield module(normalise(xb)).float()


def _evaluate(module, x: "ImageSet", y, normalise, batch_size: int, dev) -> tuple[float, float]:
    """Plain cross-entropy (no smoothing) and accuracy: what the best epoch is chosen on."""
    import torch
    import torch.nn.functional as F

    y = torch.as_tensor(y).to(dev)
    loss = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.long)
    start = 0
    for logits in _batch_logits(module, x, normalise, batch_size, dev):
        yb = y[start:start + len(logits)]
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
        start += len(logits)
    return loss.item() / len(y), correct.item() / len(y)


def _optimizer(module, train: "TrainSpec"):
    """AdamW or Nesterov SGD; norm weights and biases are not decayed (timm's parameter groups).

    The fused implementation where torch has one for the parameters' device: on CPU, AdamW's
    default per-parameter loop took 6.5% of a ResNet-18's training time and the fused step is
    7x faster (benchmarks/profile_training.py).
    """
    import torch
    from timm.optim import param_groups_weight_decay

    def make(**kwargs):  # fresh groups each time: torch writes its choices into the group dicts
        groups = param_groups_weight_decay(module, train.resolved_weight_decay)
        if train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=train.resolved_lr, momentum=train.momentum,
                                   nesterov=train.momentum > 0, **kwargs)
        return torch.optim.AdamW(groups, lr=train.resolved_lr, **kwargs)

    try:
        return make(fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device, dtype or torch
        return make()


def _lr_factor(train: "TrainSpec", total_steps: int, warmup_steps: int):
    """Per step: linear warm-up to the full rate, then cosine to zero (or constant)."""
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if train.schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _check_images(x, cfg: InputConfig, split: str) -> None:
    import torch

    shape = tuple(x.shape)
    if x.dtype != torch.uint8 or len(shape) != 4 or shape[1:] != (cfg.in_chans, cfg.size, cfg.size):
        raise FusionEngineError(
            f"{split} images must be uint8 (N, {cfg.in_chans}, {cfg.size}, {cfg.size}), got {x.dtype} {shape}")


class _Progress:
    """Epoch and batch bars on stderr (stdout stays clean for output), or nothing when quiet."""

    def __init__(self, label: str, epochs: int, quiet: bool):
        self.quiet = quiet
        self.label = label
        self.epochs = epochs

    def __enter__(self) -> "_Progress":
        if self.quiet:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True),
        )
        self.progress.__enter__()
        name = f"{self.label} " if self.label else ""
        self.epoch_task = self.progress.add_task(f"{name}epochs", total=self.epochs, info="")
        self.batch_task = self.progress.add_task("  batches", total=1, info="")
        self.last_refresh = 0.0
        return self

    def skip(self, epochs: int) -> None:
        """Count epochs a resumed run does not repeat."""
        if epochs and not self.quiet:
            self.progress.update(self.epoch_task, completed=epochs, info=f"resumed after epoch {epochs}")

    def start_epoch(self, steps: int) -> None:
        if not self.quiet:
            self.progress.reset(self.batch_task, total=steps, info="")

    def step(self, step: int, running_loss) -> None:
        """``running_loss`` is a callable, read twice a second at most: reading it syncs a GPU."""
        if self.quiet:
            return
        now = time.monotonic()
        if now - self.last_refresh > 0.5:
            self.last_refresh = now
            self.progress.update(self.batch_task, completed=step + 1, info=f"loss {running_loss():.4f}")
        else:
            self.progress.update(self.batch_task, completed=step + 1)

    def end_epoch(self, train_loss: float, val_loss: float, val_acc: float) -> None:
        if not self.quiet:
            self.progress.update(self.epoch_task, advance=1,
                                 info=f"loss {train_loss:.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.4f}")

    def __exit__(self, *exc) -> None:
        if not self.quiet:
            self.progress.remove_task(self.batch_task)
            self.progress.__exit__(*exc)
