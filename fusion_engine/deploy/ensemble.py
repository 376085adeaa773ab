"""An exported ensemble, loaded and predicting: :func:`load` and :class:`Ensemble`.

The guarantee: predicting the run's own test images through an export gives the run's stored
test probabilities for that row (to 1e-5 on CPU in torch; 1e-4 in ONNX Runtime for every
first-party fuser but XGBoost stacking, whose trees jump at thresholds). It holds because every
step is the run's own code, not a re-implementation: images are decoded and resized as the run's
dataset was (:func:`fusion_engine.preprocess.decode_images`, with the resize method the card records),
members predict through :func:`fusion_engine.training.predict_logits`, their temperatures divide
float32 logits as the calibrate stage does, and the fuser is the plugin's own class restored from
its JSON state. ``fusion-engine predict`` calls the same methods.

A folder is checked against its ``SHA256SUMS`` before anything in it is read. It needs no
registry: members are rebuilt by their backbone plugins (installed ones by name; plugin files
the run loaded from its spec travel in the folder and are imported from there, like any plugin
file) and given their weights.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from ..preprocess import RESIZE_TENSOR
from ..errors import FusionEngineError
from .card import ExportCard, ExportedMember, PluginRef, read_card, require_listed, verify_sums

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..fuser import Fuser
    from ..records import InputConfig

log = logging.getLogger("fusion_engine")

RUNTIMES = ("torch", "onnx")


@dataclass
class PredictedBatch:
    """One batch of :meth:`Ensemble.proba_batches`: ``proba`` ``(n, C)`` float64 for the images
    ``start`` to ``start + n`` of the input, a row of NaN for each image that could not be read,
    and why, by position in the batch."""

    start: int
    proba: np.ndarray
    errors: dict[int, str]


def load(path: str | os.PathLike, *, runtime: str = "torch", device: str = "auto") -> "Ensemble":
    """The exported ensemble in folder ``path`` (written by ``fusion-engine export``), checked
    against its checksums, ready to predict.

    ``runtime``: ``"torch"`` (members rebuilt by their plugins; the default) or ``"onnx"`` (the
    folder's ``model.onnx`` in ONNX Runtime; needs ``pip install 'fusion-engine[onnx]'``).
    ``device``: ``"auto"`` (CUDA when there is one), ``"cpu"`` or ``"cuda"``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FusionEngineError(f"{folder}: no such folder (expected an exported ensemble)")
    listed = verify_sums(folder)
    return Ensemble(folder, read_card(folder), runtime=runtime, device=device, listed=listed)


class Ensemble:
    """A leaderboard row, exported and loaded: member networks, and the fitted fuser that
    combines them (none for a member's own row).

    ``predict_proba(images)`` and ``predict(images)`` take any of:

    - paths to image files, or one path;
    - PIL images;
    - uint8 numpy arrays: a list of images ``(H, W)`` or ``(H, W, C)``, or one array holding a
      batch ``(N, H, W)`` or ``(N, H, W, C)`` (as datasets hold them);
    - a torch tensor batch ``(N, C, H, W)``: uint8 0..255, or float 0..1 (as torchvision's
      ``ToTensor`` makes them; rounded to the nearest of the 256 levels the members were trained on).

    Images of any size: each is resized to each member's input exactly as the run's training
    data was. ``classes`` are the class names (``predict`` returns them), ``members`` the member
    names in the order the fuser takes them, ``card`` the folder's :class:`ExportCard`.
    """

    def __init__(self, path: Path, card: ExportCard, *, runtime: str = "torch", device: str = "auto",
                 listed: dict[str, str] | None = None):
        if runtime not in RUNTIMES:
            raise FusionEngineError(f"unknown runtime '{runtime}'; use torch or onnx")
        self.path = Path(path)
        self.card = card
        self.runtime = runtime
        self._listed = listed
        self._session = None
        self._modules: list = []
        self.fuser: Fuser | None = None
        #: how many images each member has run on since the ensemble was loaded (torch runtime): a
        #: cascade runs its dearer members on fewer
        self.usage: dict[str, int] = {m.name: 0 for m in card.members}
        if runtime == "onnx":  # the graph is everything: no plugin, network or fuser is built
            self._session = self._onnx_session(device)
            self.device = "cuda" if self._session.get_providers()[0].startswith("CUDA") else "cpu"
        else:
            from ..training import resolve_device

            self.device = str(resolve_device(device))
            self._modules = [self._build_member(m) for m in card.members]
            if card.fuser is not None:
                self.fuser = self._load_fuser()

    # -- what it is --------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def members(self) -> list[str]:
        return [m.name for m in self.card.members]

    @property
    def name(self) -> str:
        return f"{self.card.experiment}/{self.card.row}"

    def __repr__(self) -> str:
        return (f"Ensemble({self.name!r}, members={self.members}, fuser={self.card.fuser.fuser if self.card.fuser else None!r}, "
                f"classes={len(self.classes)}, runtime={self.runtime!r})")

    @property
    def takes_colour(self) -> bool:
        """Whether a member takes 3 channels: then a uint8 array ``(H, W, 3|4)`` is one colour
        image, not a batch of grey ones (see :func:`as_items`)."""
        return any(m.input.in_chans == 3 for m in self.card.members)

    @property
    def input_configs(self) -> list["InputConfig"]:
        """Each member's input config, in member order."""
        from ..records import InputConfig

        return [InputConfig(size=m.input.size, mean=tuple(m.input.mean), std=tuple(m.input.std),
                            in_chans=m.input.in_chans, interpolation=m.input.interpolation,
                            crop_pct=m.input.crop_pct, crop_mode=m.input.crop_mode) for m in self.card.members]

    # -- predicting --------------------------------------------------------------------------------
    def predict_proba(self, images: Any, *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``(N, C)`` float64, one row per image; an error naming the first
        image that cannot be read (``proba_batches`` reports every one instead)."""
        items = as_batch(images, colour=self.takes_colour)
        items = as_items(images, colour=self.takes_colour) if items is None else items
        parts, failed = [], {}
        for batch in self.proba_batches(items, batch_size=batch_size):
            parts.append(batch.proba)
            failed.update({batch.start + i: why for i, why in batch.errors.items()})
        if failed:
            first = min(failed)
            raise FusionEngineError(f"{len(failed)} of {len(items)} images could not be read; the first (#{first}): "
                                    f"{failed[first]}")
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)))

    def predict(self, images: Any, *, batch_size: int = 64) -> np.ndarray:
        """The predicted class name of each image."""
        return np.asarray(self.classes, dtype=object)[np.argmax(self.predict_proba(images, batch_size=batch_size), axis=1)]

    def proba_batches(self, images: Any, *, batch_size: int = 64) -> Iterator[PredictedBatch]:
        """Probabilities batch by batch; an image that cannot be read gets a row of NaN and its
        reason in the batch's ``errors``, and the others go on. What ``fusion-engine predict`` uses."""
        if batch_size < 1:
            raise FusionEngineError(f"batch size must be at least 1, got {batch_size}")
        batch = as_batch(images, colour=self.takes_colour) if self.card.resize == RESIZE_TENSOR else None
        if batch is not None:  # one uint8 tensor: resized as a dataset's arrays, with no per-image work
            from ..preprocess import batch_pixels, pixels_key

            for start in range(0, len(batch), batch_size):
                chunk = batch[start:start + batch_size]
                pixels = {pixels_key(cfg): batch_pixels(chunk, cfg) for cfg in self.input_configs}
                yield PredictedBatch(start, self.proba_from_pixels(pixels), {})
            return
        items = as_items(images, colour=self.takes_colour)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pixels, errors = self.pixels(chunk)
            proba = np.full((len(chunk), len(self.classes)), np.nan)
            ok = [i for i in range(len(chunk)) if i not in errors]
            if ok:
                proba[ok] = self.proba_from_pixels(pixels)
            yield PredictedBatch(start, proba, errors)

    def pixels(self, items: Sequence[Any]) -> tuple[dict[tuple, "torch.Tensor"], dict[int, str]]:
        """``items`` decoded and resized once per distinct member input (size, channels and
        preparation: :func:`fusion_engine.preprocess.pixels_key`), as the run's data were; the
        images that fail for any input are left out of every tensor."""
        from ..preprocess import decode_images, pixels_key

        decoded, errors = {}, {}
        for key, cfg in {pixels_key(cfg): cfg for cfg in self.input_configs}.items():
            x, failed = decode_images(items, cfg, method=self.card.resize)
            decoded[key] = (x, [i for i in range(len(items)) if i not in failed])
            for i, why in failed.items():
                errors.setdefault(i, why)
        ok = [i for i in range(len(items)) if i not in errors]
        pixels = {}
        for key, (x, rows) in decoded.items():
            keep = [rows.index(i) for i in ok] if len(rows) != len(ok) else slice(None)
            pixels[key] = x[keep]
        return pixels, errors

    def proba_from_pixels(self, pixels: dict[tuple, "torch.Tensor"]) -> np.ndarray:
        """Probabilities for decoded images (:meth:`pixels`), in this ensemble's runtime. A fuser
        that stops early (a cascade: ``Fuser.consult_order``) runs each member only on the images
        that reach it, in torch; an ONNX graph runs every member."""
        if self.runtime == "onnx":
            return self._onnx_proba(pixels)
        order = self.fuser.consult_order() if self.fuser is not None else None
        if order is None:
            return self.fuse(self.member_logits(pixels))
        return self.fuse(self._consulted_logits(pixels, order))

    def member_logits(self, pixels: dict[tuple, "torch.Tensor"]) -> np.ndarray:
        """Each member's float32 logits ``(M, N, C)`` as the run fused them (divided by the
        member's temperature when it was calibrated)."""
        from ..preprocess import pixels_key

        return np.stack([self._logits_of(k, pixels[pixels_key(cfg)]) for k, cfg in enumerate(self.input_configs)])

    def _consulted_logits(self, pixels: dict[tuple, "torch.Tensor"], order: Sequence[int]) -> np.ndarray:
        """Member logits ``(M, N, C)`` with each member run, in the fuser's ``order``, only on the
        images the fuser consults it for; zeros where it was not run, which the fuser does not read
        (``consult_order``'s promise: whether member ``order[k]`` is consulted depends only on the
        members before it, whose logits are already real)."""
        import torch

        from ..preprocess import pixels_key

        cfgs = self.input_configs
        n = len(next(iter(pixels.values())))
        logits = np.zeros((len(cfgs), n, len(self.classes)), dtype=np.float32)
        for m in order:
            rows = np.flatnonzero(self.fuser.consulted(logits)[:, m])
            if len(rows):
                x = pixels[pixels_key(cfgs[m])]
                logits[m, rows] = self._logits_of(m, x if len(rows) == n else x[torch.from_numpy(rows)])
        return logits

    def _logits_of(self, k: int, x: "torch.Tensor") -> np.ndarray:
        """Member ``k``'s float32 logits for images ``x``, divided by its temperature if it has
        one (as members.calibrate_member: float32 logits / T); counted in :attr:`usage`."""
        from ..training import predict_logits

        member, cfg = self.card.members[k], self.input_configs[k]
        logits = predict_logits(self._modules[k], cfg, x, batch_size=max(1, len(x)), device=self.device)
        if member.class_order is not None:  # as executors._predict_from_weights: the dataset's class order
            logits = np.ascontiguousarray(logits[:, member.class_order])
        if member.temperature is not None:
            logits = (logits / member.temperature).astype(np.float32)
        self.usage[member.name] += len(x)
        return logits

    def fuse(self, logits: np.ndarray) -> np.ndarray:
        """The row's probabilities from member logits ``(M, N, C)``: the fuser's, or for a
        member's own row its softmax (as the leaderboard scores members)."""
        if self.card.fuser is not None and self.fuser is None:
            self.fuser = self._load_fuser()
        if self.fuser is None:
            from scipy.special import softmax

            return softmax(np.asarray(logits[0], dtype=np.float64), axis=1)
        return self.fuser.predict_proba(logits)

    # -- building ----------------------------------------------------------------------------------
    def _file(self, name: str) -> Path:
        if self._listed is None:  # being written by export: nothing to check against yet
            return self.path / name
        return require_listed(self._listed, self.path, name)

    def _plugins(self, ref: PluginRef):
        """The plugin manager that provides ``ref``: installed plugins, or the folder's copy of a
        plugin file."""
        from ..plugins import get_plugins

        cache = self.__dict__.setdefault("_plugin_cache", {})
        key = ref.file or ""
        if key not in cache:
            cache[key] = get_plugins([self._file(ref.file)], entry_points=False) if ref.file else get_plugins()
        return cache[key]

    def _provided(self, kind: str, name: str, ref: PluginRef, who: str):
        from ..errors import SpecError

        try:
            provided = self._plugins(ref).catalog().get(kind, name)
        except SpecError as exc:
            where = (f"plugin {ref.distribution} {ref.version or ''}".strip() if ref.distribution else f"plugin {ref.plugin}")
            raise FusionEngineError(f"{self.path}: {who} needs {kind} '{name}' from {where}, which is not installed "
                                    f"here ({exc})") from None
        found = provided.code
        if ref.distribution and found.get("version") and ref.version and found.get("version") != ref.version:
            log.warning("%s: %s was exported with %s %s; this is %s %s", self.path, who, ref.distribution, ref.version,
                        found.get("distribution"), found.get("version"))
        return provided

    def _build_member(self, member: ExportedMember):
        import torch
        from pydantic import ValidationError
        from safetensors.torch import load_file

        from ..executors import build_network

        who = f"member {member.name}"
        provided = self._provided("backbone", member.backbone, member.plugin, who)
        params = dict(member.params)
        for name, rel in member.files.items():
            params[name] = str(self._file(rel))
        try:
            bound = provided.record.params.model_validate(params, context={"base_dir": self.path})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise FusionEngineError(f"{self.path}: {who}: params.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        with torch.random.fork_rng(devices=[]):  # building seeds torch; the caller's random state is left as it was
            built = build_network(provided.record, bound, num_classes=member.num_classes, image_size=member.image_size,
                                  seed=member.seed)
        module = built.module
        try:
            module.load_state_dict(load_file(str(self._file(member.weights))))
        except RuntimeError as exc:
            raise FusionEngineError(f"{self.path}: {who}: its weights do not fit the network backbone "
                                    f"'{member.backbone}' builds here: {' '.join(str(exc).split())[:300]}") from None
        return module.eval()

    def _load_fuser(self) -> "Fuser":
        from pydantic import ValidationError

        from ..calibration import TemperatureScaled

        spec = self.card.fuser
        who = f"fuser {spec.name}"
        provided = self._provided("fuser", spec.fuser, spec.plugin, who)
        try:
            params = provided.record.params.model_validate(spec.params)
        except ValidationError as exc:
            raise FusionEngineError(f"{self.path}: {who}: params: {exc.errors()[0]['msg']}") from None
        fuser = provided.record.cls(**params.model_dump())
        if spec.temperature:
            fuser = TemperatureScaled(fuser)
        try:
            state = json.loads(self._file(spec.state).read_text(encoding="utf-8"))["state"]
            return fuser.set_state(state)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FusionEngineError(f"{self.path}: {who}: cannot restore its state from {spec.state}: "
                                    f"{type(exc).__name__}: {exc}") from None

    # -- ONNX Runtime ------------------------------------------------------------------------------
    def _onnx_session(self, device: str):
        from .graph import need_onnx, session

        if self.card.onnx is None:
            raise FusionEngineError(f"{self.path} has no ONNX graph; export it with --onnx to use --runtime onnx")
        need_onnx()

        return session(self._file(self.card.onnx.file).read_bytes(), device)

    def _onnx_proba(self, pixels: dict[tuple, "torch.Tensor"]) -> np.ndarray:
        from ..preprocess import pixels_key

        feeds = {}
        for spec in self.card.onnx.inputs:
            x = pixels[pixels_key(spec)].numpy()
            feeds[spec.name] = x if spec.dtype == "uint8" else (x.astype(np.float32) / np.float32(255.0))
        return self._session.run([self.card.onnx.output], feeds)[0].astype(np.float64)


def as_batch(images: Any, *, colour: bool = False) -> "torch.Tensor | None":
    """A uint8 ``(N, C, H, W)`` tensor when ``images`` is one batch (a tensor, or a numpy array
    ``(N, H, W[, C])``, or with ``colour`` one image ``(H, W, 3|4)``: see :func:`as_items`), as a
    view where it can be; None for anything else."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
        import torch

        if _one_colour_image(images, colour):
            images = images[None]
        x = torch.from_numpy(images)
        if images.ndim == 3:
            return x[:, None]
        return x.permute(0, 3, 1, 2) if images.shape[-1] in (1, 2, 3, 4) else None
    if _is_tensor(images):
        return _uint8_tensor(images)
    return None


def as_items(images: Any, *, colour: bool = False) -> list:
    """What :meth:`Ensemble.predict_proba` takes, as a list of single images: paths, PIL
    images or uint8 arrays ``(H, W[, C])``.

    One numpy array is read by its shape: ``(N, H, W, C)`` is a batch; ``(H, W)`` is one image;
    ``(H, W, 3)`` or ``(H, W, 4)`` is one colour image when the ensemble takes colour
    (``colour``: a member takes 3 channels), and any other 3-D array, or any 3-D array for an
    ensemble of grey members, is a batch ``(N, H, W)`` of grey images. A list of arrays, or a
    4-D batch, is never ambiguous."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise FusionEngineError(f"image arrays must be uint8, got {images.dtype} (pass float images as a torch "
                                    f"tensor (N, C, H, W) in [0, 1])")
        if images.ndim == 2 or _one_colour_image(images, colour):
            return [images]
        if images.ndim not in (3, 4):
            raise FusionEngineError(f"an image array is one image (H, W[, C]) or a batch (N, H, W) or (N, H, W, C), "
                                    f"got shape {images.shape}")
        return list(images)
    if _is_tensor(images):
        return _tensor_items(images)
    if isinstance(images, (list, tuple)):
        return [_tensor_items(x[None])[0] if _is_tensor(x) else x for x in images]
    raise FusionEngineError(f"cannot predict {type(images).__name__}: pass paths, PIL images, uint8 arrays or a "
                            f"torch tensor batch (N, C, H, W)")


def _one_colour_image(array: np.ndarray, colour: bool) -> bool:
    return colour and array.ndim == 3 and array.shape[-1] in (3, 4)


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "ndim")


def _tensor_items(x: "torch.Tensor") -> list[np.ndarray]:
    """A ``(N, C, H, W)`` tensor as ``N`` uint8 ``(H, W, C)`` arrays."""
    return list(_uint8_tensor(x).permute(0, 2, 3, 1).numpy())


def _uint8_tensor(x: "torch.Tensor") -> "torch.Tensor":
    """A ``(N, C, H, W)`` image tensor as uint8 on the CPU; floats in [0, 1] become the nearest
    of the 256 levels."""
    import torch

    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise FusionEngineError(f"a tensor of images is a batch (N, C, H, W) with C of 1 or 3, got shape {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.is_floating_point():
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise FusionEngineError(f"float images must lie in [0, 1] (as torchvision's ToTensor makes them); "
                                    f"got values from {x.min().item():.3g} to {x.max().item():.3g}")
        return (x.double() * 255).round_().to(torch.uint8)
    if x.dtype != torch.uint8:
        raise FusionEngineError(f"image tensors must be uint8 or float, got {x.dtype}")
    return x
