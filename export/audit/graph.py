"""Reading any ONNX recurrence: resolve each LSTM/GRU node's weights and split them per gate (onnx + numpy only)."""
from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lstm_onnx.contract import ONNX_DOMAINS, read_contract

from .external import ExternalDataError, tensor_to_array
from .folding import FoldError, fold_constant
from .gates import ONNX_ORDER as ONNX_ORDER_OF
from .gates import GateShapeError, cell_of, split_gates
from .heads import FLOAT_TYPES, collect_head
from .quantized import QUANT_ROLES, attach_quantization, dequantize_recurrent
from .result import DIRECTIONS, Audit, AuditInputError, Layer
from .shapes import check_node_shapes

LOOP_OPS = ("Loop", "Scan")
# Operator input positions (ONNX spec) of the tensors the audit reads.
ROLES: dict[str, dict[str, int]] = {
    "LSTM": {"W": 1, "R": 2, "B": 3, "sequence_lens": 4, "initial_h": 5, "initial_c": 6, "P": 7},
    "GRU": {"W": 1, "R": 2, "B": 3, "sequence_lens": 4, "initial_h": 5},
}
ROLES["DynamicQuantizeLSTM"] = {**ROLES["LSTM"], **QUANT_ROLES}
WEIGHT_ROLES = ("W", "R", "B", "P")
CONSTANT_ROLES = WEIGHT_ROLES + tuple(QUANT_ROLES)  # what must be a constant for the audit to read the weights


class GraphIndex:
    """Name lookups over one graph: who produces a value, and the constant behind it if there is one."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path):
        self.graph = graph
        self.base_dir = base_dir
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.producers = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self._cache: dict[str, np.ndarray] = {}

    def initializer_array(self, name: str) -> np.ndarray:
        """An initializer's value (read once; external data read safely)."""
        if name not in self._cache:
            self._cache[name] = tensor_to_array(self.initializers[name], self.base_dir)
        return self._cache[name]

    def resolve(self, name: str) -> tuple[str, np.ndarray] | None:
        """Follow Identity nodes to an initializer or Constant; None if the value is computed or an input.

        Raises ExternalDataError when the tensor's external data is unsafe or does not fit.
        """
        seen: set[str] = set()
        while name and name not in seen:
            seen.add(name)
            if name in self.initializers:
                return name, self.initializer_array(name)
            node = self.producers.get(name)
            if node is None:
                return None
            if node.op_type == "Identity":
                name = node.input[0]
                continue
            if node.op_type == "Constant":
                return name, self._constant_value(node, name)
            return None
        return None

    def follow_identity(self, name: str) -> str:
        """The name behind a chain of Identity nodes, without reading any tensor."""
        seen: set[str] = set()
        while name not in seen and (node := self.producers.get(name)) is not None and node.op_type == "Identity":
            seen.add(name)
            name = node.input[0]
        return name

    def _constant_value(self, node: onnx.NodeProto, name: str) -> np.ndarray:
        if name not in self._cache:
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                self._cache[name] = tensor_to_array(attr["value"].t, self.base_dir)
            elif "value_float" in attr:
                self._cache[name] = np.array(attr["value_float"].f, dtype=np.float32)
            elif "value_floats" in attr:
                self._cache[name] = np.array(list(attr["value_floats"].floats), dtype=np.float32)
            else:
                raise ExternalDataError(f"Constant '{name}': got attributes {sorted(attr)}, expected a float tensor value")
        return self._cache[name]

    def trace_input(self, name: str, labels: dict[int, str]) -> list[str]:
        """The ops a value passes through, nearest first, back to a recurrent node or a graph input."""
        steps: list[str] = []
        for _ in range(64):  # long enough for any reshaping chain; stops runaway walks on odd graphs
            node = self.producers.get(name)
            if node is None:
                steps.append(f"graph input '{name}'" if name in self.inputs else f"'{name}'")
                return steps
            if cell_of(node):
                steps.append(f"{labels.get(id(node), node.name)} output Y")
                return steps
            weights = [i for i in node.input[1:] if i in self.initializers and self.initializers[i].data_type in FLOAT_TYPES]
            steps.append(node.op_type + (f" (with weights {', '.join(weights)})" if weights else ""))
            name = node.input[0] if node.input else ""
        steps.append("...")
        return steps


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file without touching external data (that is read later, safely, per tensor)."""
    path = Path(path)
    if not path.is_file():
        raise AuditInputError(f"model {path}: not found, expected an ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends; all mean "not an ONNX model"
        raise AuditInputError(f"model {path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in a topological order that keeps the file's order where it is free (Kahn with a heap)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    deps = [{produced_by[n] for n in node.input if n in produced_by and produced_by[n] != i}
            for i, node in enumerate(graph.node)]
    waiting = [len(d) for d in deps]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    done = set(order)
    order += [i for i in range(len(graph.node)) if i not in done]  # a cycle: keep the rest in file order
    return [graph.node[i] for i in order]


def read_graph(path: str | os.PathLike) -> Audit:
    """Every LSTM/GRU node of an ONNX model, its weights resolved and split per gate; no checks yet."""
    model = load_model(path)
    graph = model.graph
    index = GraphIndex(graph, Path(path).resolve().parent)
    contract, contract_problem = read_contract(model)
    producer = " ".join(x for x in (model.producer_name, model.producer_version) if x) or "unknown"
    audit = Audit(str(path), producer, [], [], contract)
    if contract_problem:
        audit.add("DIGEST_MISMATCH", "error", contract_problem)

    nodes = topological_nodes(graph)
    recurrent = [n for n in nodes if cell_of(n)]
    labels = {id(n): f"layer{k}" for k, n in enumerate(recurrent)}
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 17)
    claimed: set[str] = set()  # tensors the recurrent nodes read: never counted again as head parameters
    for k, node in enumerate(recurrent):
        layer = _build_layer(audit, index, k, node, labels, opset, claimed)
        audit.layers.append(layer)
        claimed.update(layer.sources[r] for r in CONSTANT_ROLES if layer.sources.get(r))
    check_node_shapes(audit, model, recurrent)
    audit.head = collect_head(audit, index, claimed)
    _note_graph_shape(audit, graph, recurrent)
    return audit


def _resolve_role(audit: Audit, index: GraphIndex, layer: Layer, role: str, value: str, opset: int,
                  claimed: set[str]) -> tuple[str, np.ndarray] | None:
    """The constant behind one input of a recurrent node: direct, through Identity/Constant, or folded."""
    found = index.resolve(value)
    if found is not None or role not in CONSTANT_ROLES:
        return found
    try:
        folded = fold_constant(index, value, opset)
    except FoldError as exc:
        audit.add("UNRESOLVED_WEIGHT", "error", f"{layer.label} '{layer.node}' {role} '{value}': {exc}", [value])
        return None
    if folded is None:
        audit.add("UNRESOLVED_WEIGHT", "error", f"{layer.label} '{layer.node}' {role} '{value}': computed at run time "
                  "from a graph input, expected an initializer, a Constant or a subgraph of constants the audit can "
                  "fold", [value])
        return None
    layer.paths[role] = folded.path
    claimed.update(folded.leaves)
    return value, folded.array


def _build_layer(audit: Audit, index: GraphIndex, k: int, node: onnx.NodeProto, labels: dict[int, str], opset: int,
                 claimed: set[str]) -> Layer:
    attrs = _attribute_values(node)
    op = cell_of(node) or node.op_type
    direction = str(attrs.get("direction", "forward"))
    name = node.name or f"{node.op_type} #{k}"
    reads = index.trace_input(node.input[0], labels) if node.input else []
    layer = Layer(k, name, op, int(attrs.get("hidden_size", 0)), None, direction, attrs, {}, reads,
                  op_type=node.op_type if node.op_type != op else "")
    if direction not in DIRECTIONS:
        audit.add("MALFORMED_NODE", "error",
                  f"{layer.label} '{name}': direction {direction!r}, expected one of {', '.join(DIRECTIONS)}")
        return layer
    arrays: dict[str, np.ndarray | None] = {}
    for role, pos in ROLES[node.op_type].items():
        value = node.input[pos] if pos < len(node.input) else ""
        if not value:
            layer.sources[role] = None
            continue
        try:
            found = _resolve_role(audit, index, layer, role, value, opset, claimed)
        except ExternalDataError as exc:
            audit.add("EXTERNAL_DATA", "error", f"{layer.label} {role}: {exc}", [value])
            layer.sources[role] = index.follow_identity(value)  # claimed here: not reported again as a head tensor
            arrays[role] = None
            continue
        if found is not None and found[0] in index.inputs:
            audit.add("OVERRIDABLE_WEIGHT", "warning", f"{layer.label} {role} '{found[0]}' is also a graph input: a caller "
                      "can replace it at run time, so the audited values may not be the ones used", [found[0]])
        layer.sources[role] = found[0] if found else (value if role not in CONSTANT_ROLES else None)
        if role in CONSTANT_ROLES:
            arrays[role] = found[1] if found else None
    quants = {}
    try:
        if layer.op_type:
            for role in ("W", "R"):
                if arrays.get(role) is not None:
                    names = tuple(str(layer.sources.get(r)) for r in (role, f"{role}_scale", f"{role}_zero_point"))
                    arrays[role], quants[role] = dequantize_recurrent(
                        f"{layer.label} {node.op_type}", role, arrays[role], arrays.get(f"{role}_scale"),
                        arrays.get(f"{role}_zero_point"), len(ONNX_ORDER_OF[op]), names)
        if not layer.hidden_size and arrays.get("R") is not None and arrays["R"].ndim == 3:
            layer.hidden_size = int(arrays["R"].shape[-1])
        if not layer.hidden_size or all(arrays.get(r) is None for r in WEIGHT_ROLES):
            return layer
        names = {r: str(layer.sources.get(r)) for r in WEIGHT_ROLES}
        layer.gates = split_gates(op, k, layer.hidden_size, direction, {r: arrays.get(r) for r in WEIGHT_ROLES}, names)
    except GateShapeError as exc:
        audit.add("MALFORMED_NODE", "error", str(exc), [s for s in layer.sources.values() if s])
        return layer
    for role, quant in quants.items():
        attach_quantization(layer.gates, role, quant)
    if arrays.get("W") is not None:
        layer.input_size = int(arrays["W"].shape[2])
    layer.params = sum(int(arrays[r].size) for r in WEIGHT_ROLES if arrays.get(r) is not None)
    return layer


def _attribute_values(node: onnx.NodeProto) -> dict[str, Any]:
    """Node attributes as plain Python values (strings decoded), for the report."""
    def plain(v: Any) -> Any:
        return v.decode() if isinstance(v, bytes) else v

    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: [plain(x) for x in v] if isinstance(v, list) else plain(v) for k, v in values.items()}


def _note_graph_shape(audit: Audit, graph: onnx.GraphProto, recurrent: list[onnx.NodeProto]) -> None:
    loops = [n for n in graph.node if n.op_type in LOOP_OPS]
    plain = [n for n in graph.node if n.op_type == "RNN"]
    if plain:
        audit.add("UNSUPPORTED_OP", "warning", f"{len(plain)} plain RNN node(s) ({', '.join(n.name or 'RNN' for n in plain)}): "
                  "only LSTM and GRU gates are audited")
    if not recurrent:
        if loops:
            names = ", ".join(f"{n.op_type} '{n.name}'" if n.name else n.op_type for n in loops)
            msg = (f"no LSTM or GRU node: the recurrence is computed by {names}, so there is no explicit recurrent op "
                   "whose gates can be audited; export with explicit LSTM/GRU ops")
        else:
            msg = "no LSTM or GRU node in the graph: nothing recurrent to audit"
        audit.add("NO_RECURRENT_OP", "error", msg)
    elif loops:
        audit.add("LOOP_PRESENT", "info", f"{len(loops)} Loop/Scan node(s) besides the recurrent nodes: "
                  "any weights used inside their bodies are not audited")
