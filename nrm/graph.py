"""An NRM's network as a graph: nodes in topological order, each an op (nrm.ops) over named inputs.

    Node("layer1.0.conv1", Conv(16, 16, 3, padding=1), ("stem.relu",))

The graph's input is called ``INPUT``; the last node is the classifier (a linear op with one output
per class) and its output is the logits. Node names are the module paths of the converted torch
module (latent names), unique, and the checkpoint keys its tensors by them (``<name>.weight``).
``chain`` builds a plain stack; ``infer_shapes`` validates a graph and says
which node is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nrm.ops import Linear, Op, OpError, Shape, op_from_dict, out_shape

INPUT = "input"
RESERVED = ("detector", "posthoc")  # checkpoint keys of fitted arrays start with these


class GraphError(ValueError):
    """A graph that is not a valid NRM; the message names the node."""


@dataclass(frozen=True)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op.type, "inputs": list(self.inputs), "attrs": self.op.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, index: int) -> Node:
        if not isinstance(d, dict) or not {"name", "op", "inputs"} <= set(d):
            raise GraphError(f"nodes[{index}]: expected an object with 'name', 'op', 'inputs' and 'attrs', got {d!r}")
        if unknown := sorted(set(d) - {"name", "op", "inputs", "attrs"}):
            raise GraphError(f"nodes[{index}] ({d['name']!r}): unknown key(s) {unknown}")
        try:
            op = op_from_dict(str(d["op"]), dict(d.get("attrs") or {}))
        except OpError as e:
            raise GraphError(f"node {d['name']!r}: {e}") from None
        return cls(str(d["name"]), op, tuple(str(i) for i in d["inputs"]))


def chain(*items: Op | tuple[str, Op]) -> list[Node]:
    """A plain stack: each op reads the previous one. Items are ops or (name, op); unnamed nodes are
    called ``<type><k>`` (k counts that type)."""
    nodes: list[Node] = []
    counts: dict[str, int] = {}
    prev = INPUT
    for item in items:
        name, op = item if isinstance(item, tuple) else (None, item)
        counts[op.type] = counts.get(op.type, 0) + 1
        node = Node(name or f"{op.type}{counts[op.type]}", op, (prev,))
        nodes.append(node)
        prev = node.name
    return nodes


def infer_shapes(nodes: Sequence[Node], input_shape: Shape, n_classes: int) -> dict[str, Shape]:
    """Per-sample output shape of every node; GraphError names the first node that does not fit."""
    if not nodes:
        raise GraphError("graph: no nodes")
    shapes: dict[str, Shape] = {INPUT: tuple(input_shape)}
    for node in nodes:
        if node.name in shapes:
            raise GraphError(f"node {node.name!r}: duplicate name")
        if "/" in node.name or not node.name or node.name.split(".")[0] in RESERVED:
            raise GraphError(f"node {node.name!r}: names must be non-empty, hold no '/' and not start with "
                             f"{' or '.join(RESERVED)}")
        missing = [i for i in node.inputs if i not in shapes]
        if missing:
            raise GraphError(f"node {node.name!r} ({node.op.type}): input(s) {missing} are not defined before it")
        try:
            shapes[node.name] = out_shape(node.op, [shapes[i] for i in node.inputs])
        except OpError as e:
            raise GraphError(f"node {node.name!r}: {e}") from None
    last = nodes[-1]
    if not isinstance(last.op, Linear):
        raise GraphError(f"node {last.name!r}: the last node must be the linear classifier, got {last.op.type!r}")
    if last.op.out != n_classes:
        raise GraphError(f"node {last.name!r}: the classifier has {last.op.out} outputs but there are {n_classes} classes")
    used = {i for n in nodes for i in n.inputs}
    if dead := [n.name for n in nodes[:-1] if n.name not in used]:
        raise GraphError(f"node(s) {dead}: output never used (every node must lead to the classifier)")
    return shapes
