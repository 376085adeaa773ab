"""Training one member and predicting with it: the only code that runs a network.

Images arrive as ``uint8`` tensors ``(N, C, S, S)`` already at the backbone's size and stay that
way in memory; each batch is indexed from them whole, augmented on the device (random
translation, optional flips) and normalised there, so the loop does no per-sample Python work
and costs what a bare PyTorch loop costs. On CPU a run is reproducible: the same seed gives the
same history and weights.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from .errors import FusionEngineError
from .records import InputConfig

log = logging.getLogger("fusion_engine")

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .spec import TrainSpec
    from .checkpoint import Checkpoint

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
    x_train: "torch.Tensor",
    y_train: "torch.Tensor",
    x_val: "torch.Tensor",
    y_val: "torch.Tensor",
    *,
    seed: int,
    device: str = "auto",
    label: str = "",
    quiet: bool = False,
    checkpoint: "Checkpoint | None" = None,
    soft_targets: "torch.Tensor | None" = None,
    distill: Any = None,
) -> TrainResult:
    """Train ``module`` on uint8 images; keep the weights of the epoch with the lowest val loss.

    With ``soft_targets`` (a teacher's probabilities on the train images, ``(N, C)``) the module
    is a student: its loss is :class:`DistillationLoss` with ``distill``'s ``alpha`` and
    ``temperature``; the epoch is still chosen by the cross-entropy on val labels.

    The module is left on the device, holding the best weights.

    With a ``checkpoint`` (an object with ``load() -> (tensors, state) | None`` and
    ``save(tensors, state)``, as :class:`fusion_engine.checkpoint.Checkpoint`), the full training state
    is saved after every epoch (weights, best weights, optimizer, scheduler, RNG states) and
    training resumes after the last saved epoch; on CPU the result equals an uninterrupted run's.
    """
    import torch

    from .checkpoint import restore, snapshot

    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    n = len(x_train)
    if n == 0 or len(x_val) == 0:
        raise FusionEngineError(f"member {label or '?'}: the train and val splits must not be empty")
    _check_images(x_train, input_cfg, "train")
    _check_images(x_val, input_cfg, "val")

    torch.manual_seed(seed)
    if cuda:
        torch.backends.cudnn.benchmark = True
        module.to(dev, memory_format=torch.channels_last)
    else:
        module.to(dev)

    data_dev = dev if cuda and x_train.nbytes <= DEVICE_RESIDENT_BYTES else torch.device("cpu")
    x_train, y_train = x_train.to(data_dev), y_train.to(data_dev)
    if cuda and data_dev.type == "cpu":
        x_train, y_train = x_train.pin_memory(), y_train.pin_memory()
    if cuda and x_val.nbytes <= DEVICE_RESIDENT_BYTES:
        x_val = x_val.to(dev)
    order_gen = torch.Generator(device=data_dev).manual_seed(seed)
    aug_gen = torch.Generator(device=dev).manual_seed(seed + 1)

    steps_per_epoch = math.ceil(n / min(train.batch_size, n))
    optimizer = _optimizer(module, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(train, steps_per_epoch * train.epochs, round(train.warmup_epochs * steps_per_epoch)))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
    if soft_targets is not None:  # the labels travel with the softened teacher probabilities, batch by batch
        criterion = DistillationLoss(train.label_smoothing, distill.alpha, distill.temperature)
        y_train = torch.cat([y_train.to(torch.float32)[:, None],
                             criterion.soften(soft_targets.to(torch.float32)).to(y_train.device)], dim=1)
    normalise = _Normaliser(input_cfg, dev)
    shift_px = round(train.augment.shift * input_cfg.size)

    def batches() -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
        """One epoch of shuffled, augmented, normalised batches on the device."""
        for idx in torch.tensor_split(torch.randperm(n, generator=order_gen, device=data_dev), steps_per_epoch):
            xb, yb = x_train[idx], y_train[idx]
            if data_dev != dev:
                xb, yb = xb.pin_memory().to(dev, non_blocking=True), yb.pin_memory().to(dev, non_blocking=True)
            yield normalise(augment(xb, shift_px, train.augment.hflip, aug_gen)), yb

    history: list[dict] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    train_time = 0.0
    images = 0
    started = time.perf_counter()
    resumed_from, elapsed_before = 0, 0.0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        resumed = restore(saved, module, optimizer, scheduler, order_gen, aug_gen, dev)
        resumed_from, elapsed_before = resumed["epoch"], resumed["elapsed"]
        history, best_loss, best_epoch, best_state = resumed["history"], resumed["best_loss"], resumed["best_epoch"], resumed["best_state"]
        train_time, images = resumed["train_time"], resumed["images"]
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
            for step, (xb, yb) in enumerate(batches()):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = criterion(module(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(yb)
                seen += len(yb)
                progress.step(step, lambda: loss_sum.item() / seen)
            train_loss = loss_sum.item() / n
            train_time += time.perf_counter() - t0
            images += n

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
                    images=images, elapsed=elapsed_before + time.perf_counter() - started))
            if train.patience is not None and epoch - best_epoch >= train.patience:
                break

    if best_state is None:
        raise FusionEngineError(f"member {label or '?'}: the val loss was never finite (training diverged); try a lower lr")
    module.load_state_dict(best_state)
    return TrainResult(
        state_dict=best_state, history=history, best_epoch=best_epoch,
        train_seconds=elapsed_before + time.perf_counter() - started,
        images_per_second=images / train_time if train_time else 0.0, resumed_from_epoch=resumed_from,
    )


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
    module: "torch.nn.Module", input_cfg: InputConfig, x: "torch.Tensor", *, batch_size: int, device: str = "auto",
) -> "np.ndarray":
    """Logits ``(N, num_classes)`` as float32 for uint8 images, in eval mode.

    Batches of ``batch_size``, halved until they fit whenever the device runs out of memory.
    """
    import torch

    dev = resolve_device(device)
    x = torch.as_tensor(x)
    _check_images(x, input_cfg, "input")
    module.to(dev)
    if dev.type == "cuda":
        module.to(memory_format=torch.channels_last)
    normalise = _Normaliser(input_cfg, dev)
    out: list = []
    while True:  # the largest batch that fits: halve it when the device runs out of memory
        try:
            for logits in _batch_logits(module, x[sum(len(o) for o in out):], normalise, batch_size, dev):
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


def augment(x: "torch.Tensor", shift_px: int, hflip: bool, generator: "torch.Generator") -> "torch.Tensor":
    """Random translation by up to ``shift_px`` pixels (zero padding) and optional flips, per image.

    One gather for the whole batch: each image's crop window of the padded batch, with its
    columns reversed where it is flipped.
    """
    import torch
    import torch.nn.functional as F

    if not shift_px and not hflip:
        return x
    b, _, h, w = x.shape
    dev = x.device
    p = shift_px
    if p:
        x = F.pad(x, (p, p, p, p))
    oy, ox = torch.randint(0, 2 * p + 1, (2, b, 1), generator=generator, device=dev)
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    if hflip:
        flip = torch.rand(b, 1, generator=generator, device=dev) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
    out = x[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


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
        import torch

        return torch.addcmul(-self.shift, x.float(), self.scale).contiguous(memory_format=self.memory_format)


def _batch_logits(module, x, normalise, batch_size: int, dev) -> Iterator["torch.Tensor"]:
    import torch

    module.eval()
    cuda = dev.type == "cuda"
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size]
            if xb.device != dev:
                xb = (xb.pin_memory() if cuda else xb).to(dev, non_blocking=True)
            yield module(normalise(xb)).float()


def _evaluate(module, x, y, normalise, batch_size: int, dev) -> tuple[float, float]:
    """Plain cross-entropy (no smoothing) and accuracy: what the best epoch is chosen on."""
    import torch
    import torch.nn.functional as F

    y = y.to(dev)
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

    if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (cfg.in_chans, cfg.size, cfg.size):
        raise FusionEngineError(
            f"{split} images must be uint8 (N, {cfg.in_chans}, {cfg.size}, {cfg.size}), got {x.dtype} {tuple(x.shape)}")


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
