"""``model.onnx`` for a loaded ensemble (:func:`write_onnx`): its members exported by torch.onnx
behind their normalisation, then its temperatures and fuser (:mod:`fusion_engine.deploy.graph`
builds both parts and joins them), checked in ONNX Runtime against the engine before the card
records it. Members are exported once per process however many rows of a run follow."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FusionEngineError
from ..jsoncodec import encode_json
from .card import ONNX_FILE, ExportedOnnx, OnnxInput, file_sha256

log = logging.getLogger("fusion_engine")

#: above this, the check warns (ONNX Runtime's promise against the engine)
ONNX_TOLERANCE = 1e-4


def write_onnx(ensemble, folder: Path, dtype: str = "uint8", check_images: Any = None, console=None) -> ExportedOnnx:
    """Write ``folder/model.onnx`` for a loaded (torch) ``ensemble``: its members exported by
    torch.onnx behind their normalisation, then its temperatures and fuser
    (:mod:`fusion_engine.deploy.graph`); checked in ONNX Runtime against the engine on
    ``check_images`` (random pixels when None). Returns what the card records of it."""
    import onnx

    from .graph import head_model, merge, opset_of

    card = ensemble.card
    from ..preprocess import pixels_key

    inputs = []
    for key in dict.fromkeys(pixels_key(m.input) for m in card.members):  # one input per distinct preparation
        size, chans, interpolation, crop_pct, crop_mode = key
        name = f"images_{size}" + ("_gray" if chans == 1 else "")
        name = name if all(i.name != name for i in inputs) else f"{name}_{len(inputs)}"
        inputs.append(OnnxInput(name=name, size=size, in_chans=chans, interpolation=interpolation, crop_pct=crop_pct,
                                crop_mode=crop_mode, dtype=dtype,
                                members=[m.name for m in card.members if pixels_key(m.input) == key]))
    if console is not None:
        console.log(f"exporting {len(card.members)} member network{'s' if len(card.members) != 1 else ''} to ONNX "
                    f"(torch.onnx, dynamo; tens of seconds each on a CPU)")

    def head(opset: int, ir_version: int):
        try:
            return head_model(ensemble.fuser, n_members=len(card.members), n_classes=len(card.classes),
                              temperatures=[m.temperature for m in card.members], opset=opset, ir_version=ir_version)
        except FusionEngineError:
            raise
        except Exception as exc:
            raise FusionEngineError(f"cannot build the ONNX graph of row {card.row}'s fuser: {type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:300]}") from None

    head(20, 10)  # a fuser without a graph is refused before the members' slow export
    members = _members_graph(ensemble, folder, inputs, dtype)
    try:
        model = merge(members, head(opset_of(members), members.ir_version))
    except FusionEngineError:
        raise
    except Exception as exc:
        raise FusionEngineError(f"cannot build the ONNX graph of row {card.row}: {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]}") from None
    onnx.save_model(model, str(folder / ONNX_FILE))
    spec = ExportedOnnx(opset=opset_of(model), inputs=inputs)
    spec.check = _check_onnx(ensemble, members, folder / ONNX_FILE, spec, check_images, console)
    return spec


def _check_onnx(ensemble, members, path: Path, spec: ExportedOnnx, images, console) -> dict[str, Any]:
    """ONNX Runtime against the engine on ``images`` (random pixels when None); and the fuser
    alone, on ORT's own member logits, against the engine's fuser."""
    import torch

    from ..preprocess import pixels_key
    from .graph import session

    if images is not None:
        from .ensemble import as_items

        pixels, _ = ensemble.pixels(as_items(images, colour=ensemble.takes_colour))
        what = "test images"
    else:
        rng = np.random.default_rng(0)
        pixels = {pixels_key(i): torch.from_numpy(rng.integers(0, 256, (16, i.in_chans, i.size, i.size),
                                                                     dtype=np.uint8)) for i in spec.inputs}
        what = "random images"
    engine = ensemble.proba_from_pixels(pixels)
    feeds = {}
    for i in spec.inputs:
        x = pixels[pixels_key(i)].numpy()
        feeds[i.name] = x if i.dtype == "uint8" else x.astype(np.float32) / np.float32(255.0)
    got = session(path.read_bytes(), "cpu").run([spec.output], feeds)[0].astype(np.float64)
    member_logits = session(members.SerializeToString(), "cpu").run(["logits"], feeds)[0]
    if any(m.temperature is not None for m in ensemble.card.members):
        temps = np.asarray([1.0 if m.temperature is None else m.temperature for m in ensemble.card.members], np.float32)
        member_logits = (member_logits / temps.reshape(-1, 1, 1)).astype(np.float32)
    fused = ensemble.fuse(member_logits)
    diff, fuser_diff = float(np.abs(got - engine).max()), float(np.abs(got - fused).max())
    flips = int((got.argmax(1) != engine.argmax(1)).sum())
    if console is not None:
        console.log(f"ONNX Runtime on {len(got)} {what}: max |onnx - engine| = {diff:.1e} "
                    f"(the fuser alone: {fuser_diff:.1e}), {flips} predicted classes differ")
    if diff > ONNX_TOLERANCE:
        log.warning("ONNX Runtime's probabilities differ from the engine's by up to %.1e on %d %s (%d predicted "
                    "classes differ); on the graph's own member logits the fuser agrees to %.1e: %s", diff, len(got),
                    what, flips, fuser_diff,
                    "the members' float32 rounding moved samples across a tree threshold" if fuser_diff < ONNX_TOLERANCE
                    else "the fuser's graph does not match its predict_proba")
    return {"images": int(len(got)), "of": what, "max_abs_diff": diff, "max_abs_diff_fuser": fuser_diff,
            "argmax_differences": flips}


#: member graphs exported in this process, by what decides them: exporting several rows of one run
#: (or the tests' many fusers) exports the members once
_MEMBER_GRAPHS: dict[tuple, bytes] = {}


def _members_graph(ensemble, tmp: Path, inputs: list[OnnxInput], dtype: str):
    import onnx

    from .graph import members_model

    card = ensemble.card
    names = [i.name for i in inputs]
    input_of = [next(k for k, i in enumerate(inputs) if m.name in i.members) for m in card.members]
    key = (dtype, tuple(names), tuple(input_of), tuple(
        (m.backbone, encode_json(m.params, sort_keys=True, fallback=str), file_sha256(tmp / m.weights), m.image_size,
         m.input.model_dump_json(), tuple(m.class_order or ())) for m in card.members))
    if key not in _MEMBER_GRAPHS:
        try:
            model = members_model(ensemble._modules, ensemble.input_configs, names, input_of, dtype,
                                  [m.class_order for m in card.members])
        except Exception as exc:
            raise FusionEngineError(f"torch.onnx.export cannot export the members of row {card.row}: "
                                    f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
        if len(_MEMBER_GRAPHS) >= 4:
            _MEMBER_GRAPHS.pop(next(iter(_MEMBER_GRAPHS)))
        _MEMBER_GRAPHS[key] = model.SerializeToString()
    return onnx.load_model_from_string(_MEMBER_GRAPHS[key])
