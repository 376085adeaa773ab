"""Shipping a run's result: an exported ensemble, and predicting new images with it.

- :mod:`~fusion_engine.deploy.card`: :class:`ExportCard`, the typed, versioned description of an
  export folder, and the folder's layout and checksums;
- :mod:`~fusion_engine.deploy.export`: :func:`export_ensemble`, a leaderboard row written as a
  self-contained folder (weights, fuser state, card, checksums, optionally ``model.onnx``);
- :mod:`~fusion_engine.deploy.ensemble`: :func:`load` and :class:`Ensemble`, the folder loaded
  and predicting, in torch or in ONNX Runtime;
- :mod:`~fusion_engine.deploy.graph`: the ONNX graph of a whole ensemble (:class:`FuserGraph`
  is what a fuser writes its part with), and :mod:`~fusion_engine.deploy.onnx_file`, which
  writes it as ``model.onnx`` and checks it in ONNX Runtime;
- :mod:`~fusion_engine.deploy.predict`: ``fusion-engine predict``, images in, one row each out.

Nothing here imports torch, onnx or onnxruntime at import time.
"""

from __future__ import annotations

from .card import EXPORT_FORMAT, ExportCard
from .ensemble import Ensemble, load
from .export import export_ensemble
from .graph import FuserGraph

__all__ = ["EXPORT_FORMAT", "Ensemble", "ExportCard", "FuserGraph", "export_ensemble", "load"]
