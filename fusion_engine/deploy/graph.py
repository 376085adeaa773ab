"""One ONNX graph for a whole ensemble: images in, class probabilities out.

The graph is put together from two parts, joined with :func:`onnx.compose.merge_models`:

- the **members**: every member network exported once by ``torch.onnx.export(dynamo=True)``,
  behind the normalisation the engine applies (``x * 1/(255 std) - mean/std``, inside the graph),
  with one graph input per distinct (size, channels) of the members and a dynamic batch
  dimension; its output is the stacked logits ``(M, batch, C)``;
- the **head**: each member's temperature, then the fuser, written node by node with
  :class:`FuserGraph` in float64 (as the engine's numpy fusers compute), cast to float32 at the
  end. A fuser writes its own part (``Fuser.onnx_proba``), so a plugin's fuser can be exported
  too.

Why this way (measured on ResNet-18 + MobileNetV2, see docs/deploying.md): the fuser arithmetic
never passes through the exporter's optimiser, which rewrites ``x * (1 - 1e-6)`` to ``x`` and
``x - 1e-9`` to ``x`` (its no-op rules compare constants with a relative tolerance of 1e-5) and
so changes vote tie-breaks; members are exported once however many fusers follow; and XGBoost's
trees (through onnxmltools) fit the same path. Images are not resized inside the graph: ONNX's
antialiased ``Resize`` differs from the engine's by one grey level on a pixel in a hundred, so
the caller resizes, as :func:`fusion_engine.preprocess.decode_images` does.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import FusionEngineError

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from ..fuser import Fuser

#: the largest batch the exported graph declares (its batch dimension is dynamic up to this)
MAX_BATCH = 1 << 16
#: dtype names a graph uses, and their ONNX codes (onnx.TensorProto)
_DTYPES = {"float32": 1, "uint8": 2, "int64": 7, "bool": 9, "float64": 11}


def need_onnx(*, export: bool = False) -> None:
    """One line saying what to install when the ``onnx`` extra is missing: onnxruntime to run
    a graph; onnx and onnxscript (torch's exporter) too to export one."""
    import importlib.util

    needed = ("onnx", "onnxruntime", "onnxscript") if export else ("onnxruntime",)
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise FusionEngineError(f"{'--onnx' if export else '--runtime onnx'} needs {', '.join(missing)}: "
                                f"pip install 'fusion-engine[onnx]'")


class FuserGraph:
    """Builds the part of an ONNX graph that turns member logits into class probabilities.

    A fuser that can be exported to ONNX implements ``onnx_proba(self, graph, logits) -> str``:
    ``logits`` names the ``(M, batch, C)`` float64 member logits (after each member's
    temperature); the method adds the nodes that compute its ``predict_proba`` and returns the
    name of the ``(batch, C)`` float64 probabilities. ``n_members`` and ``n_classes`` are M and C.
    Names of nodes and constants are made unique here, so a fuser never chooses one.
    """

    def __init__(self, n_members: int, n_classes: int, *, prefix: str = "fuser/"):
        self.n_members = n_members
        self.n_classes = n_classes
        self.prefix = prefix
        self.nodes: list = []
        self.initializers: list = []
        self.opsets: dict[str, int] = {}
        self._count = 0

    def name(self, base: str) -> str:
        """A fresh value name."""
        self._count += 1
        return f"{self.prefix}{base}_{self._count}"

    def const(self, value: Any, dtype: str = "float64") -> str:
        """A constant tensor (float64 unless ``dtype`` says otherwise), by name."""
        from onnx import numpy_helper

        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.dtype(dtype)), name))
        return name

    def op(self, op_type: str, *inputs: str, domain: str = "", outputs: int = 1, **attributes: Any) -> Any:
        """Add one node; returns its output's name (a list of names when ``outputs > 1``)."""
        from onnx import helper

        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(op_type), domain=domain,
                                           **attributes))
        return names[0] if outputs == 1 else names

    def cast(self, x: str, dtype: str) -> str:
        """``x`` as ``dtype`` (``"float64"``, ``"float32"``, ``"int64"``...)."""
        return self.op("Cast", x, to=_DTYPES[dtype])

    def weighted_sum(self, weights: Sequence[float], x: str) -> str:
        """``sum_m weights[m] * x[m]`` over the first axis of ``x`` (``(M, batch, C)`` -> ``(batch, C)``)."""
        w = self.const(np.asarray(weights, dtype=np.float64).reshape(-1, 1, 1))
        return self.op("ReduceSum", self.op("Mul", x, w), self.const([0], "int64"), keepdims=0)

    def rows(self, like: str, row: Sequence[float]) -> str:
        """``row`` repeated for every sample of ``like`` (``(M, batch, C)``): a constant output."""
        batch = self.op("Gather", self.op("Shape", like), self.const([1], "int64"), axis=0)
        shape = self.op("Concat", batch, self.const([len(row)], "int64"), axis=0)
        return self.op("Expand", self.const(np.asarray(row, np.float64).reshape(1, -1)), shape)

    def include(self, model: "onnx.ModelProto", inputs: dict[str, str], outputs: Sequence[str]) -> list[str]:
        """Add every node of another model (a converter's output, e.g. onnxmltools' trees), its
        inputs wired to the values named by ``inputs`` (its input name -> a name here); returns
        the names its ``outputs`` get here."""
        from onnx import helper

        prefix = self.name("include") + "/"
        rename = dict(inputs)

        def renamed(name: str) -> str:
            if not name:
                return name
            if name not in rename:
                rename[name] = prefix + name
            return rename[name]

        for init in model.graph.initializer:
            copy = type(init)()
            copy.CopyFrom(init)
            copy.name = renamed(init.name)
            self.initializers.append(copy)
        for node in model.graph.node:
            self.nodes.append(helper.make_node(
                node.op_type, [renamed(i) for i in node.input], [renamed(o) for o in node.output],
                name=prefix + (node.name or node.op_type), domain=node.domain,
                **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        for opset in model.opset_import:
            if opset.domain not in ("", "ai.onnx"):
                self.opsets[opset.domain] = max(self.opsets.get(opset.domain, 0), opset.version)
        known = {o.name for o in model.graph.output}
        unknown = [o for o in outputs if o not in known]
        if unknown:
            raise ValueError(f"the included model has no output {unknown[0]!r}; it has {sorted(known)}")
        return [rename[o] for o in outputs]


# -- the head: member temperatures, then the fuser -----------------------------------------------------

def head_model(fuser: "Fuser | None", *, n_members: int, n_classes: int, temperatures: Sequence[float | None],
               opset: int, ir_version: int) -> "onnx.ModelProto":
    """``logits`` float32 ``(M, batch, C)`` -> ``proba`` float32 ``(batch, C)``: each member's
    temperature (in float32, as the engine divides its float32 logits), then ``fuser`` in float64,
    or, for a member's own row (``fuser`` None), its softmax."""
    from onnx import TensorProto, helper

    g = FuserGraph(n_members, n_classes)
    logits = "logits"
    if any(t is not None for t in temperatures):
        scale = np.asarray([1.0 if t is None else t for t in temperatures], dtype=np.float32).reshape(-1, 1, 1)
        logits = g.op("Div", logits, g.const(scale, "float32"))
    x = g.cast(logits, "float64")
    if fuser is None:
        proba = g.op("Softmax", g.op("Squeeze", x, g.const([0], "int64")), axis=1)
    else:
        try:
            proba = fuser.onnx_proba(g, x)
        except NotImplementedError as exc:
            raise FusionEngineError(f"{exc}; export without --onnx") from None
    g.op("Cast", proba, to=TensorProto.FLOAT)
    g.nodes[-1].output[0] = "proba"
    graph = helper.make_graph(
        g.nodes, "fusion_engine_head",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n_members, "batch", n_classes])],
        [helper.make_tensor_value_info("proba", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    *(helper.make_opsetid(d, v) for d, v in g.opsets.items())])
    model.ir_version = ir_version  # merge_models wants the members graph's; make_model stamps the newest
    return model


# -- the members: networks behind their normalisation --------------------------------------------------

def members_model(modules: Sequence["torch.nn.Module"], cfgs: Sequence[Any], input_names: Sequence[str],
                  input_of: Sequence[int], dtype: str,
                  class_orders: Sequence[Sequence[int] | None] | None = None) -> "onnx.ModelProto":
    """The member networks as one graph: inputs ``input_names`` (``dtype`` images ``(batch,
    C, S, S)``; uint8 0..255 or float32 0..1), member ``i`` reading input ``input_of[i]`` and
    its outputs put in the classes' order by ``class_orders[i]`` (None: as they are); output
    ``logits`` ``(M, batch, C)`` float32."""
    import torch

    net = _member_nets(modules, cfgs, input_of, dtype, class_orders or [None] * len(modules)).eval()
    example = []
    for k in range(len(input_names)):
        cfg = cfgs[list(input_of).index(k)]
        shape = (2, cfg.in_chans, cfg.size, cfg.size)  # batch 2: an example batch of 1 would be specialised
        example.append(torch.zeros(shape, dtype=torch.uint8 if dtype == "uint8" else torch.float32))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, tuple(example), None, dynamo=True, verbose=False, external_data=False,
                                    input_names=list(input_names), output_names=["logits"],
                                    dynamic_shapes=(tuple({0: batch} for _ in input_names),))
    model = program.model_proto
    # the exporter's metadata holds source paths and line numbers: the same model would differ in bytes
    del model.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
    return model


def _member_nets(modules, cfgs, input_of, dtype: str, class_orders):
    """The module torch.onnx exports: images (one tensor per graph input) -> each member's
    normalisation (as ``training._Normaliser``: one multiply-add) and network -> ``(M, N, C)``."""
    import torch
    from torch import nn

    class MemberNets(nn.Module):
        def __init__(self):
            super().__init__()
            self.nets = nn.ModuleList(modules)
            self.input_of = list(input_of)
            top = 255.0 if dtype == "uint8" else 1.0
            for i, cfg in enumerate(cfgs):
                std = torch.tensor(cfg.std, dtype=torch.float32).view(1, -1, 1, 1)
                mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, -1, 1, 1)
                self.register_buffer(f"scale{i}", 1.0 / (top * std))
                self.register_buffer(f"shift{i}", mean / std)
            self.reordered = [order is not None for order in class_orders]
            for i, order in enumerate(class_orders):
                if order is not None:
                    self.register_buffer(f"order{i}", torch.tensor(order, dtype=torch.long))

        def forward(self, *images):
            out = []
            for i, net in enumerate(self.nets):
                x = images[self.input_of[i]].float()
                logits = net(torch.addcmul(-getattr(self, f"shift{i}"), x, getattr(self, f"scale{i}")))
                out.append(logits[:, getattr(self, f"order{i}")] if self.reordered[i] else logits)
            return torch.stack(out, 0)

    return MemberNets()


def merge(members: "onnx.ModelProto", head: "onnx.ModelProto") -> "onnx.ModelProto":
    """The members graph followed by the head, checked; the opset list de-duplicated (onnx 1.23's
    merge writes both models' lists one after the other)."""
    import onnx
    from onnx import helper

    merged = onnx.compose.merge_models(members, head, io_map=[("logits", "logits")])
    versions: dict[str, int] = {}
    for opset in merged.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())
    onnx.checker.check_model(merged)
    return merged


def opset_of(model: "onnx.ModelProto") -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def session(model: "bytes | str", device: str = "cpu"):
    """An ONNX Runtime session on CPU, or CUDA first when ``device`` is cuda and ORT has it."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") or device == "auto":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device.startswith("cuda"):
            raise FusionEngineError("device 'cuda' was asked for but onnxruntime has no CUDA provider "
                                    "(pip install onnxruntime-gpu); use --device cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    return ort.InferenceSession(model, options, providers=providers)
