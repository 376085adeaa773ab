"""The parameters every timm backbone takes (``BackboneParams``) and the ``timm`` backbone's
(``TimmParams``: the architecture by name), checked when a spec is read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fusion_engine import WEIGHT_SUFFIXES, Params


SMALL_INPUT_MAX = 64


_RESERVED_KWARGS = {"model_name", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                    "cache_dir", "num_classes", "in_chans", "drop_rate"}


class BackboneParams(Params):
    """Parameters of every timm backbone; ``timm`` adds the architecture name."""

    pretrained: Optional[bool] = Field(
        None, description="start from timm's pretrained weights (the model's tag, or timm's default one), from the "
                          "Hugging Face cache (downloaded when online); default: on when model names a tag (arch.tag)")
    pretrained_file: Optional[Path] = Field(
        None, description="local weights (.safetensors, or .pth/.pt/.bin read with weights_only); relative to the spec's folder")
    pretrained_sha256: Optional[str] = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$", description="checksum of pretrained_file, verified before loading")
    in_chans: Literal[1, 3] = Field(3, description="input channels: 3 (RGB) or 1 (grayscale), as images are loaded")
    small_input: Union[bool, Literal["auto"]] = Field(
        "auto", description=f"CIFAR-style stem for small images; auto: on when image_size <= {SMALL_INPUT_MAX}")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the classifier")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments for timm.create_model")

    @field_validator("pretrained_file")
    @classmethod
    def _weights_file(cls, v: Optional[Path], info: ValidationInfo) -> Optional[Path]:
        if v is None:
            return v
        base_dir = (info.context or {}).get("base_dir")
        path = v.expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ValueError(f"'{v}' is not a weights file; use one of {', '.join(WEIGHT_SUFFIXES)}")
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path.resolve()

    @field_validator("kwargs")
    @classmethod
    def _free_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(_RESERVED_KWARGS & set(v))
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set through kwargs (the engine or a named parameter sets it)")
        return v

    @model_validator(mode="after")
    def _checksum_needs_file(self) -> "BackboneParams":
        if self.pretrained_sha256 and self.pretrained_file is None:
            raise ValueError("pretrained_sha256 is given but pretrained_file is not")
        if self.pretrained and self.pretrained_file is not None:
            raise ValueError("give pretrained: true (timm's weights, from the Hugging Face cache) or pretrained_file "
                             "(a local file), not both")
        return self


class TimmParams(BackboneParams):
    model: str = Field(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_\-]+)?$",
                       description="a timm architecture name, optionally with a pretrained tag (arch.tag)")

