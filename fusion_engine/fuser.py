"""The fuser contract, in scikit-learn's vocabulary.

A fuser combines member outputs: ``fit(logits, y) -> self`` on validation outputs, then
``predict_proba(logits) -> (N, C)``. ``logits`` is always an array of shape ``(M, N, C)``
(members, samples, classes). Parameters are plain keyword arguments of ``__init__`` (validated
beforehand by the fuser's ``Params`` model); what ``fit`` learns lives in attributes ending in
``_`` and round-trips through JSON with :meth:`Fuser.get_state` / :meth:`Fuser.set_state`.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from scipy.special import log_softmax, softmax

from .jsoncodec import from_jsonable, to_jsonable

__all__ = ["Fuser", "check_logits", "log_softmax", "softmax"]


def check_logits(logits: Any, y: Any = None) -> np.ndarray:
    """``logits`` as a float64 ``(M, N, C)`` array; checks ``y`` against it when given."""
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"logits must have shape (members, samples, classes), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("logits contain NaN or infinity")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (arr.shape[1],):
            raise ValueError(f"y has shape {y.shape}, expected ({arr.shape[1]},)")
        if y.min(initial=0) < 0 or y.max(initial=0) >= arr.shape[2]:
            raise ValueError(f"labels must lie in [0, {arr.shape[2]})")
    return arr


class Fuser:
    """Base class for fusers. Subclasses implement :meth:`predict_proba` and, if they learn
    from validation outputs, :meth:`fit`.

    ``requires_fit`` says whether ``fit`` learns anything: the engine scores a fuser that does on
    validation out-of-fold (cross-fitted), so a val score never comes from data it was fitted on.
    It is read on the instance, so it may be a property that depends on the parameters.
    A fitted fuser that sets ``weights_`` (one per member) has them shown on the leaderboard.

    Inference cost: a fuser with ``needs_costs`` true is fitted as ``fit(logits, y,
    costs=...)``, ``costs`` being each member's inference cost in milliseconds per image (an
    ``(M,)`` array, measured by the engine or given in the spec). A fuser that does not run every
    member on every sample (a cascade) says which it ran in :meth:`consulted`; the engine prices
    its leaderboard row by it, on test.
    """

    requires_fit: bool = True
    needs_costs: bool = False

    def check_members(self, n_members: int) -> None:
        """Raise ``ValueError`` naming the parameter when the parameters cannot serve
        ``n_members`` members (``weights`` of another length, say). The engine calls it before
        a run starts, from ``validate`` too, with the number of members the spec gives the
        fuser; the base ``fit`` calls it as well. The default checks nothing."""

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "Fuser":
        check_logits(logits, y)
        self.check_members(int(np.shape(logits)[0]))
        self.n_members_ = int(np.shape(logits)[0])
        self.n_classes_ = int(np.shape(logits)[2])
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, logits: np.ndarray) -> np.ndarray:
        return np.argmax(self.predict_proba(logits), axis=1)

    def onnx_proba(self, graph: Any, logits: str) -> str:
        """Optional, for ``fusion-engine export --onnx``: add to ``graph`` (a
        :class:`fusion_engine.FuserGraph`) the ONNX nodes that compute :meth:`predict_proba` of
        the fitted fuser from ``logits``, the name of the float64 ``(M, batch, C)`` member logits;
        return the name of the float64 ``(batch, C)`` probabilities. The engine checks the graph
        against :meth:`predict_proba` when it exports."""
        raise NotImplementedError(f"fuser {type(self).__name__} has no ONNX graph (it does not implement onnx_proba)")

    def consulted(self, logits: np.ndarray) -> np.ndarray:
        """Which members the fitted fuser runs for each sample: ``(N, M)`` booleans. Every
        member for every sample, unless a fuser stops early (a cascade) and overrides this."""
        arr = check_logits(logits)
        return np.ones((arr.shape[1], arr.shape[0]), dtype=bool)

    def consult_order(self) -> list[int] | None:
        """Optional, for a fuser that stops early (overrides :meth:`consulted`): the member
        indices in the order it consults them, such that whether it consults member ``order[k]``
        for a sample depends only on the logits of the members before it, and its
        ``predict_proba`` of a sample reads only the members it consults. An exported ensemble
        then runs each member only on the images that need it. None (the default): every member
        on every image."""
        return None

    # -- parameters, as scikit-learn's BaseEstimator does it ----------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def clone(self) -> "Fuser":
        """A fresh, unfitted fuser with the same parameters (fuser-valued ones cloned too)."""
        params = {k: v.clone() if isinstance(v, Fuser) else v for k, v in self.get_params().items()}
        return type(self)(**params)

    # -- JSON state ------------------------------------------------------------------------
    def get_state(self, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """What ``fit`` learned, as JSON-able values: every attribute ending in ``_``.

        For state that is not numbers and arrays (e.g. a booster in its own JSON format),
        override this and :meth:`set_state`, encoding those attributes yourself and passing
        their names in ``skip``.
        """
        try:
            return {k: to_jsonable(v) for k, v in vars(self).items()
                    if k.endswith("_") and not k.startswith("_") and k not in skip}
        except TypeError as exc:
            raise TypeError(f"{exc} in a fuser's state; override get_state/set_state") from None

    def set_state(self, state: dict[str, Any]) -> "Fuser":
        for key, value in state.items():
            if not key.endswith("_"):
                raise ValueError(f"unexpected state key '{key}'")
            setattr(self, key, from_jsonable(value))
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
