"""The member card: one typed, versioned description of a stored member.

A card is written beside a member's files in the zoo (``zoo/<key>/card.json``) and read wherever
a member is looked at: by a run reusing it, by ``zoo show``, by ``gc`` re-indexing a folder the
index lost. It says what the member is (its spec, key material, data and input config), how it
was made (history, timings, device, library versions) and which files hold it (with checksums).

Versions: cards without a ``version`` field were written by fusion-engine 0.1 before cards were
typed (version 1); they read unchanged. Version 2 derives the index row from the card's own
fields; it still writes the copy under ``index`` that version 1 carried, so that 0.1 can rebuild
its index from cards this version wrote. A card of a version newer than this code is refused,
never guessed at.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

CARD_VERSION = 2


class _Part(BaseModel):
    # ``allow``: a card written by a newer version keeps what this one does not know when read
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class CardSpec(_Part):
    """The member as the spec gave it, plugin parameters resolved (``train`` is false for a member
    run from its weights; a predictions member has ``predictions`` and ``kind`` instead)."""

    name: str
    backbone: Optional[str] = None
    params: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] | Literal[False] | None = None  # None: not given (a predictions member)
    seed: Optional[int] = None  # None: not trained here


class CardData(_Part):
    """The data it was trained and scored on."""

    dataset: str
    params: dict[str, Any] = Field(default_factory=dict)
    fingerprint: str
    split_sha256: str
    classes: list[str]
    split_sizes: dict[str, int] = Field(default_factory=dict)


class CardInput(_Part):
    """What its network takes: square size, normalisation, channels; and how its images were
    prepared for evaluation (:mod:`fusion_engine.preprocess`: the defaults are the small-image
    path's plain resize, which cards written before these fields used) and the augmentation
    pipeline it trained with."""

    size: int
    mean: list[float]
    std: list[float]
    in_chans: int = 3
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"
    pipeline: Optional[str] = None


class CardMetrics(_Part):
    val_accuracy: Optional[float] = None
    val_loss: Optional[float] = None


class CardTimings(_Part):
    train_seconds: float = 0.0
    predict_seconds: float = 0.0
    images_per_second: float = 0.0


class Checksum(_Part):
    sha256: str
    bytes: int


class CardOrigin(_Part):
    """The file a member not trained by the engine came from: its name, sha256, and the class
    names its outputs were in (None: the dataset's order)."""

    file: Optional[str] = None
    sha256: Optional[str] = None
    class_names: Optional[list[str]] = None


class CardTeacher(_Part):
    """What a student was distilled from: the teacher's name and kind (``fuser`` or ``member``),
    its members' zoo keys, a fuser teacher's spec, the sha256 of its probabilities on train, and
    the distillation settings."""

    name: str
    kind: Optional[str] = None  # every engine-written card has it; one without is still read
    members: dict[str, Optional[str]] = Field(default_factory=dict)
    fuser: Optional[dict[str, Any]] = None
    targets_sha256: Optional[str] = None
    distill: Optional[dict[str, Any]] = None


class MemberCard(_Part):
    """``zoo/<key>/card.json``. ``key``, ``created`` and ``files`` are set when it is published.

    ``source`` says where the member's outputs came from: ``trained`` by the engine, run from
    ``weights`` trained elsewhere, or read from ``predictions`` made elsewhere (no weights then);
    ``origin`` identifies that file (its name, sha256, and the class order it was read in). A
    ``student`` was trained by the engine to imitate ``teacher`` (a fuser's or member's
    probabilities on train: its name, kind, members' keys and the sha256 of those targets).
    """

    version: int = CARD_VERSION
    source: Literal["trained", "weights", "predictions", "student"] = "trained"
    origin: Optional[CardOrigin] = None
    teacher: Optional[CardTeacher] = None
    format: int = 1  # the key format (:data:`fusion_engine.zoo.keys.ZOO_FORMAT`) the member was keyed with
    key: Optional[str] = None
    created: Optional[str] = None
    name: str
    experiment: str
    run_id: Optional[str] = None
    spec: CardSpec
    backbone: str
    plugin: str = ""
    key_material: dict[str, Any]
    data: CardData
    input: Optional[CardInput] = None  # None for predictions made elsewhere
    metrics: CardMetrics = Field(default_factory=CardMetrics)
    best_epoch: Optional[int] = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    resumed_from_epoch: Optional[int] = None
    n_params: Optional[int] = None  # unknown for predictions made elsewhere
    timings: CardTimings = Field(default_factory=CardTimings)
    device: Optional[str] = None
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, Checksum] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _unversioned_is_version_1(cls, data: Any) -> Any:
        """A card read without a ``version`` was written by fusion-engine 0.1."""
        if isinstance(data, dict) and "version" not in data:
            return {**data, "version": 1}
        return data

    def index_fields(self) -> dict[str, Any]:
        """The registry index's columns for this member (besides key, files, size and date)."""
        return {"name": self.name, "experiment": self.experiment, "run_id": self.run_id,
                "backbone": self.backbone or f"({self.source})",
                "dataset": self.data.dataset, "fingerprint": self.data.fingerprint, "split": self.data.split_sha256,
                "val_accuracy": self.metrics.val_accuracy, "n_params": self.n_params}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
