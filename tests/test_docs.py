"""The spec reference and the README keep up with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from fusion_engine import spec as spec_module
from fusion_engine.plugins import get_plugins

ROOT = Path(__file__).parent.parent
SPEC_DOC = (ROOT / "docs" / "spec.md").read_text()


def spec_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    fields = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not spec_module.SplitSpec:
            fields += spec_fields(annotation, f"{prefix}{name}.")
        else:
            fields.append(f"{prefix}{name}")
    return fields


@pytest.mark.parametrize("field", spec_fields(spec_module.ExperimentSpec))
def test_every_spec_field_is_in_the_reference(field):
    leaf = field.split(".")[-1]
    assert f"`{leaf}`" in SPEC_DOC or f"`{field.split('.', 1)[-1]}`" in SPEC_DOC, field


@pytest.mark.parametrize("kind", ["backbone", "dataset", "fuser", "executor", "tracker"])
def test_every_first_party_plugin_param_is_documented(kind):
    docs = SPEC_DOC + (ROOT / "docs" / "fusers.md").read_text() + (ROOT / "docs" / "tracking.md").read_text()
    catalog = get_plugins().catalog()
    for provided in catalog.records[kind].values():
        if not provided.plugin.startswith("fusion_engine_"):
            continue
        assert f"`{provided.record.name}`" in docs, provided.record.name
        for param in provided.record.params.model_fields:
            assert re.search(rf"`{param}[`:]", docs), f"{provided.record.name}.{param}"
