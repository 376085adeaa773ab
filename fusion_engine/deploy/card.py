"""An export folder: its layout, its card, and its checksums.

==============================  ===================================================================
``ensemble.json``               the card (:class:`ExportCard`): the run, the row and its test scores,
                                the classes, each member (backbone, params, input config,
                                temperature), the fuser, how images are resized, the ONNX graph's
                                inputs, the check made when it was exported
``members/<name>/model.safetensors``  each member's weights, as the zoo stores them
``fuser.json``                  the fitted fuser: plugin, params, temperature and its state
                                (``Fuser.get_state()``; XGBoost's booster in XGBoost's own JSON)
``plugins/<file>.py``           plugin files (from a spec's ``plugins:``) that build a member or the
                                fuser; installed plugins are named by distribution and version
``files/<sha256><suffix>``      files a member's params name (pretrained weights a backbone reads
                                when it is built)
``model.onnx``                  with ``--onnx``: members and fuser as one graph
``SHA256SUMS``                  the sha256 of every other file (``sha256sum -c SHA256SUMS`` checks it)
==============================  ===================================================================

No pickle anywhere: arrays are safetensors, everything else JSON (or ONNX). A folder is checked
against ``SHA256SUMS`` before anything in it is used, and a card of a newer format than this
code reads is refused in one line, never guessed at.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import FusionEngineError

#: bump when what a folder holds, or what a card field means, changes
EXPORT_FORMAT = 1
CARD_FILE = "ensemble.json"
FUSER_FILE = "fuser.json"
ONNX_FILE = "model.onnx"
SUMS_FILE = "SHA256SUMS"
WEIGHTS_FILE = "model.safetensors"


class _Part(BaseModel):
    # ``allow``: a card written by a newer minor version keeps what this one does not know
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ExportedInput(_Part):
    """What a member's network takes: a square ``size``, normalisation, channels, and how its
    images were prepared (:mod:`fusion_engine.preprocess`): the small-image squash by default,
    or, for a member on the photo path, timm's evaluation resize and centre crop."""

    size: int
    mean: list[float]
    std: list[float]
    in_chans: int = 3
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"


class PluginRef(_Part):
    """Where a backbone or fuser comes from: an installed distribution (by name and version), or
    a plugin file shipped in the folder (``plugins/<file>.py``, with its sha256)."""

    plugin: str  # the plugin's module name when it was exported
    distribution: Optional[str] = None
    version: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None


class ExportedMember(_Part):
    """One member network: rebuilt by its backbone plugin, then given its weights."""

    name: str
    key: Optional[str] = None  # its zoo key in the registry it came from
    source: str = "trained"
    backbone: str
    plugin: PluginRef
    params: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # param name -> a file in the folder
    image_size: Optional[int] = None  # what the backbone was built for (small-input stems depend on it)
    num_classes: int
    seed: int = 0
    input: ExportedInput
    temperature: Optional[float] = None  # its calibration: logits are divided by it before fusion
    weights: str
    #: columns that put the network's outputs in the card's class order (a member run from weights
    #: trained elsewhere with another class order: ``logits[:, class_order]``); None: already in it
    class_order: Optional[list[int]] = None


class ExportedFuser(_Part):
    """The fitted fuser that combines the members (absent for a member's own row)."""

    name: str
    fuser: str
    plugin: PluginRef
    params: dict[str, Any] = Field(default_factory=dict)
    temperature: bool = False
    state: str = FUSER_FILE


class OnnxInput(_Part):
    """One input of ``model.onnx``: the images every member of one (size, channels, preparation) takes."""

    name: str
    size: int
    in_chans: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"
    dtype: Literal["uint8", "float32"]
    members: list[str]


class ExportedOnnx(_Part):
    file: str = ONNX_FILE
    opset: int
    inputs: list[OnnxInput]
    output: str = "proba"
    check: Optional[dict[str, Any]] = None


class ExportCard(_Part):
    """``ensemble.json``: everything an export folder is, in one typed, versioned document."""

    format: int = EXPORT_FORMAT
    fusion_engine: str
    created: str
    run_id: str
    experiment: str
    row: str
    kind: Literal["member", "fuser", "student"]  # a student: a network distilled from ``teacher``
    teacher: Optional[dict[str, Any]] = None  # a student row's teacher: its ``name`` and ``kind`` (fuser or member)
    classes: list[str]
    resize: Literal["tensor", "pil"]  # :func:`fusion_engine.preprocess.resize_method` of the run's dataset
    members: list[ExportedMember]
    fuser: Optional[ExportedFuser] = None
    onnx: Optional[ExportedOnnx] = None
    scores: dict[str, Any] = Field(default_factory=dict)  # the row's leaderboard entry: test (and val) scores
    data: dict[str, Any] = Field(default_factory=dict)  # dataset, fingerprint, split_sha256, split_sizes
    spec: dict[str, Any] = Field(default_factory=dict)  # the run's resolved spec
    check: Optional[dict[str, Any]] = None  # the export's own predictions against the run's stored ones
    versions: dict[str, str] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def read_card(folder: Path) -> ExportCard:
    """The card of an export folder; one line naming the problem when it is not one."""
    import json

    path = folder / CARD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FusionEngineError(f"{folder}: not an exported ensemble (no {CARD_FILE}); "
                                f"make one with fusion-engine export RUN_ID --out DIR") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FusionEngineError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FusionEngineError(f"{path}: not a JSON object")
    found = data.get("format")
    if isinstance(found, int) and found > EXPORT_FORMAT:
        raise FusionEngineError(f"{folder} was exported in format {found} by a newer fusion-engine "
                                f"({data.get('fusion_engine', '?')}); this one reads format {EXPORT_FORMAT} and older: "
                                f"upgrade fusion-engine")
    try:
        return ExportCard.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FusionEngineError(f"{path}: {where}: {first['msg']}") from None


# -- checksums ----------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_sums(folder: Path) -> Path:
    """``SHA256SUMS``: one ``<sha256>  <path>`` line per file under ``folder``, in
    ``sha256sum``'s format, so the folder can be checked without fusion-engine too."""
    from ..files import write_atomic

    lines = [f"{file_sha256(path)}  {path.relative_to(folder).as_posix()}"
             for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)]
    return write_atomic(folder / SUMS_FILE, "\n".join(lines) + "\n")


def verify_sums(folder: Path) -> dict[str, str]:
    """Check every file ``SHA256SUMS`` lists; return them (path -> sha256). A missing, changed
    or unlisted-but-needed file is an error naming it; files it does not list are never read."""
    sums_path = folder / SUMS_FILE
    try:
        text = sums_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not (folder / CARD_FILE).is_file():
            read_card(folder)  # says the folder is not an export at all
        raise FusionEngineError(f"{folder}: no {SUMS_FILE}, so its files cannot be checked; export it again") from None
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise FusionEngineError(f"{sums_path}, line {number}: expected '<sha256>  <relative path>'")
        listed[name] = digest
    for name, digest in listed.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise FusionEngineError(f"{path}: missing (listed in {SUMS_FILE}); the export is incomplete")
        if file_sha256(path) != digest:
            raise FusionEngineError(f"{path}: its sha256 differs from the one in {SUMS_FILE} (changed or damaged "
                                    f"since it was exported)")
    if CARD_FILE not in listed:
        raise FusionEngineError(f"{sums_path} does not list {CARD_FILE}; export it again")
    return listed


def require_listed(listed: dict[str, str], folder: Path, name: str) -> Path:
    """``folder / name``, which the checksums must cover."""
    if name not in listed:
        raise FusionEngineError(f"{folder}: {name} is not listed in {SUMS_FILE}; refusing to read an unchecked file")
    return folder / os.path.normpath(name)
