"""Walking ONNX graphs and naming their nodes, shared by every stage (one place for the rules).

Control-flow nodes (``If``, ``Loop``, ``Scan``) carry graphs in their attributes; a tensor
read inside such a subgraph is read by the node that owns it, and a constant stored there is a
constant of the model. Unnamed nodes are named ``Op@first_output`` wherever they are shown.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (``If`` branches, ``Loop``/``Scan`` bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from nested_graphs(sub)


def constant_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every constant tensor of ``graph`` and its subgraphs: initializers and tensor-valued
    attributes (``Constant`` values)."""
    for g in nested_graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node``'s subgraphs read from the enclosing scopes (their implicit inputs):
    what they read and do not produce, take as inputs or hold as initializers themselves."""
    names: set[str] = set()
    for sub in subgraphs(node):
        local = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
        local |= {t.name for t in sub.initializer}
        for n in sub.node:
            names |= node_reads(n) - local
        names |= {o.name for o in sub.output} - local
    return names


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensor names ``node`` reads: its inputs and its subgraphs' implicit inputs."""
    return {name for name in node.input if name} | subgraph_reads(node)


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the nodes of ``graph`` read (subgraphs included), plus its outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names |= node_reads(node)
    return names


def node_label(op_type: str, name: str, first_output: str | None) -> str:
    """How a node is shown: its name, else ``Op@first_output`` (else ``Op@?``)."""
    return name or f"{op_type}@{first_output or '?'}"


def label(node: onnx.NodeProto) -> str:
    """:func:`node_label` of an ONNX node."""
    return node_label(node.op_type, node.name, node.output[0] if node.output else None)
