"""Training-time augmentation: which of two pipelines a member takes, and the parts of each.

- **batch** (images of ``SMALL_IMAGE_MAX`` px or less, by default): images are prepared once
  (resized whole, as for evaluation) and kept as ``uint8``; each batch is shifted and flipped
  on the device in one gather (:func:`shift_flip`). No per-image work, which is what makes small
  images train at the speed of a bare loop.
- **timm** (larger images, photos): each image is decoded and transformed on its own by timm's
  training transform (``timm.data.create_transform(is_training=True)``: random-resized crop,
  flips, RandAugment, AugMix or AutoAugment, or colour jitter; ``trivialaugment`` is
  torchvision's TrivialAugmentWide) in DataLoader worker processes, ending in ``uint8`` as
  timm's prefetcher form does; on a GPU batches are normalised on the device, on the CPU each
  image in the worker that made it (``fusion_engine.training``).

Both then apply, on the normalised batch on the device, timm's random erasing (``re_prob``)
and mixup/cutmix (``mixup``, ``cutmix``: targets become class probabilities).

Randomness is reproducible and independent of where the work runs: the timm transform reseeds
Python's, NumPy's and torch's generators per sample from a seed drawn for that sample from the
run's generator, so a member trains the same with 0, 2 or 8 workers, locally or on Ray; random
erasing and mixup draw from generators of their own, saved with every checkpoint.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from .errors import FusionEngineError
from .records import InputConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .spec import AugmentSpec

#: images up to this size take the batch pipeline unless a member's ``augment.pipeline`` says otherwise
SMALL_IMAGE_MAX = 64
#: ``auto_augment`` values that are not timm's own strings
TRIVIAL_AUGMENT = "trivialaugment"
#: the fields only the timm pipeline uses, and the one only the batch pipeline uses
TIMM_ONLY = ("scale", "ratio", "auto_augment", "color_jitter", "interpolation")
BATCH_ONLY = ("shift",)


def resolve_pipeline(augment: "AugmentSpec", size: int) -> str:
    """``batch`` or ``timm``: the spec's choice, or by image size when it says ``auto``."""
    if augment.pipeline != "auto":
        return augment.pipeline
    return "batch" if size <= SMALL_IMAGE_MAX else "timm"


def hflip_of(augment: "AugmentSpec", pipeline: str) -> bool:
    """Flips: as the spec says, else off for the batch pipeline (digits and text are not
    flip-invariant) and on for the timm pipeline (photos are, as timm assumes)."""
    return augment.hflip if augment.hflip is not None else pipeline == "timm"


class AugmentError(FusionEngineError):
    """A ``train.augment`` setting the member cannot use; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def check_augment(augment: "AugmentSpec", cfg: InputConfig) -> None:
    """Refuse fields the member's pipeline would ignore, and a transform timm cannot build."""
    pipeline = resolve_pipeline(augment, cfg.size)
    unused = TIMM_ONLY if pipeline == "batch" else BATCH_ONLY
    given = [f for f in unused if f in augment.model_fields_set]
    if given:
        why = (f"this member's {cfg.size} px images take the batch pipeline" if augment.pipeline == "auto" else
               f"this member asks for the {pipeline} pipeline")
        other = "timm" if pipeline == "batch" else "batch"
        raise AugmentError(given[0], f"only the {other} pipeline uses it, and {why}; remove it or set "
                                     f"train.augment.pipeline: {other}")
    if pipeline == "timm":
        try:
            train_transform(augment, cfg)
        except Exception as exc:  # timm asserts or raises KeyError on a config string it cannot parse
            raise AugmentError("auto_augment" if augment.auto_augment else "pipeline",
                               f"timm cannot build the transform ({str(exc) or type(exc).__name__}); auto_augment takes "
                               f"e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original or {TRIVIAL_AUGMENT}") from None


def train_transform(augment: "AugmentSpec", cfg: InputConfig):
    """timm's training transform for one PIL image, ending in a ``uint8`` tensor ``(C, S, S)``."""
    from timm.data import create_transform
    from torchvision import transforms

    trivial = augment.auto_augment == TRIVIAL_AUGMENT
    interpolation = augment.interpolation or cfg.interpolation
    primary, secondary, final = create_transform(
        input_size=cfg.size, is_training=True, scale=tuple(augment.scale), ratio=tuple(augment.ratio),
        hflip=0.5 if hflip_of(augment, "timm") else 0.0, color_jitter=None if trivial else augment.color_jitter,
        auto_augment=None if trivial else augment.auto_augment, interpolation=interpolation,
        mean=_three(cfg.mean), std=_three(cfg.std), use_prefetcher=True, separate=True)
    if trivial:
        mode = transforms.InterpolationMode.BICUBIC if interpolation == "bicubic" else transforms.InterpolationMode.BILINEAR
        secondary = transforms.Compose([transforms.TrivialAugmentWide(interpolation=mode)])
    return _safe_posterize(transforms.Compose([*primary.transforms, *secondary.transforms, *final.transforms]))


def _safe_posterize(transform):
    """``transform`` with timm's posterize op replaced by :func:`posterize`: RandAugment's
    ``inc1`` ops keep 0 bits at magnitude 10, which Pillow 11 and later refuse (a ValueError in a
    DataLoader worker that would end the run), where Pillow made a black image before."""
    from timm.data import auto_augment

    for step in transform.transforms:
        ops = [*getattr(step, "ops", ()), *(op for sub in getattr(step, "policy", ()) for op in sub)]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits kept giving the black image Pillow gave before it refused it."""
    from timm.data.auto_augment import posterize as timm_posterize

    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return timm_posterize(img, bits_to_keep, **kwargs)


def _three(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


def seed_everything(seed: int) -> None:
    """Seed the generators an image transform may draw from (Python's, NumPy's, torch's)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # the CPU's: torch.manual_seed also queues CUDA's (~0.2 ms a call)


@contextmanager
def kept_random_state(keep: bool = True) -> Iterator[None]:
    """Python's, NumPy's and torch's global generators as they were before the block (when ``keep``)."""
    if not keep:
        yield
        return
    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def shift_flip(x: "torch.Tensor", shift_px: int, hflip: bool, generator: "torch.Generator") -> "torch.Tensor":
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


class BatchAugment:
    """What happens to a training batch on the device: the batch pipeline's shifts and flips
    (on ``uint8``), normalisation, then random erasing and mixup/cutmix (on floats).

    ``__call__(xb uint8, yb labels) -> (x, target)``: ``target`` is ``yb`` (class indices) or,
    with mixup or cutmix, class probabilities ``(B, num_classes)`` with label smoothing in them.
    """

    def __init__(self, augment: "AugmentSpec", cfg: InputConfig, pipeline: str, normalise, dev: "torch.device",
                 generator: "torch.Generator", *, num_classes: int, label_smoothing: float, seed: int):
        self.normalise = normalise
        self.generator = generator
        self.shift_px = round(augment.shift * cfg.size) if pipeline == "batch" else 0
        self.hflip = hflip_of(augment, pipeline) and pipeline == "batch"
        self.host = HostRandom(seed)
        self.draws_from_host = augment.re_prob > 0 or augment.mixup > 0 or augment.cutmix > 0
        self.erase = self.mix = None
        if augment.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(augment.re_prob, mode="pixel", device=dev)
        if augment.mixup > 0 or augment.cutmix > 0:
            from timm.data import Mixup

            self.mix = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mixup_prob,
                             switch_prob=augment.mixup_switch_prob, label_smoothing=label_smoothing,
                             num_classes=num_classes)

    @property
    def soft_targets(self) -> bool:
        """Whether targets are class probabilities (smoothing already in them) rather than indices."""
        return self.mix is not None

    def __call__(self, xb: "torch.Tensor", yb: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        if self.shift_px or self.hflip:
            xb = shift_flip(xb, self.shift_px, self.hflip, self.generator)
        x = self.normalise(xb)
        if self.erase is None and self.mix is None:
            return x, yb
        with self.host.active():  # timm draws from Python's and NumPy's global generators: ours, swapped in
            if self.erase is not None:
                x = self.erase(x)
            if self.mix is not None:
                return self._mixed(x, yb)
        return x, yb

    def _mixed(self, x: "torch.Tensor", yb: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """timm's Mixup on the even part of the batch (it mixes pairs); an odd last image keeps its
        own (smoothed) target."""
        import torch
        from timm.data.mixup import mixup_target

        even = len(x) - len(x) % 2
        if even == 0:
            return x, mixup_target(yb, self.mix.num_classes, 1.0, self.mix.label_smoothing)
        mixed, target = self.mix(x[:even], yb[:even])
        if even == len(x):
            return mixed, target
        last = mixup_target(yb[even:], self.mix.num_classes, 1.0, self.mix.label_smoothing)
        return torch.cat([mixed, x[even:]]), torch.cat([target, last])


class HostRandom:
    """Python's and NumPy's global generator states of one training run, swapped in while timm's
    batch augmentations draw from them, and saved in checkpoints as JSON."""

    def __init__(self, seed: int):
        import numpy as np

        saved = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        self.state = random.getstate(), np.random.get_state()
        random.setstate(saved[0])
        np.random.set_state(saved[1])

    @contextmanager
    def active(self) -> Iterator[None]:
        import numpy as np

        saved = random.getstate(), np.random.get_state()
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        try:
            yield
        finally:
            self.state = random.getstate(), np.random.get_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def to_json(self) -> dict[str, Any]:
        py, (kind, keys, pos, has_gauss, gauss) = self.state
        return {"python": [py[0], list(py[1]), py[2]],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}

    def load_json(self, data: dict[str, Any]) -> None:
        import numpy as np

        version, internal, gauss_next = data["python"]
        kind, keys, pos, has_gauss, gauss = data["numpy"]
        self.state = ((version, tuple(internal), gauss_next),
                      (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))

