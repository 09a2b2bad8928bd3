"""graph.py: subgraph walking (implicit inputs, constants at any depth) and node labels."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnx_dwdecomp.graph import (constant_tensors, graph_reads, label, nested_graphs, node_reads, subgraph_reads,
                                 subgraphs)


def _const(name: str, value: float):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array([value], np.float32)))


def _if_model():
    """x → If(cond) { then: Add(x, k_then) with k_then a Constant; else: a nested If reading
    outer `w`, whose branch holds the initializer `inner_init` } → y."""
    f = TensorProto.FLOAT
    deep = helper.make_graph([helper.make_node("Mul", ["w", "inner_init"], ["d"])], "deep", [],
                             [helper.make_tensor_value_info("d", f, [1])],
                             initializer=[numpy_helper.from_array(np.ones(1, np.float32), "inner_init")])
    then = helper.make_graph([_const("k_then", 2.0), helper.make_node("Add", ["x", "k_then"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", f, [1])])
    other = helper.make_graph([helper.make_node("If", ["cond"], ["e"], name="nested", then_branch=deep,
                                                else_branch=deep)], "else", [],
                              [helper.make_tensor_value_info("e", f, [1])])
    node = helper.make_node("If", ["cond"], ["y"], name="", then_branch=then, else_branch=other)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", f, [1]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", f, [1])],
                              initializer=[numpy_helper.from_array(np.ones(1, np.float32), "w")])
    return graph, node


def test_subgraphs_and_nesting():
    graph, node = _if_model()
    assert sorted(g.name for g in subgraphs(node)) == ["else", "then"]
    names = [g.name for g in nested_graphs(graph)]
    assert names[0] == "g" and sorted(names[1:]) == ["deep", "deep", "else", "then"]
    assert names.index("else") < names.index("deep")  # depth first: a graph before what it holds


def test_implicit_inputs_exclude_what_the_subgraph_makes_itself():
    graph, node = _if_model()
    # k_then (Constant inside), t, d, e and inner_init are local; x, w and cond come from outside
    assert subgraph_reads(node) == {"x", "w", "cond"}
    assert node_reads(node) == {"cond", "x", "w"}
    assert graph_reads(graph) == {"cond", "x", "w", "y"}


def test_constants_at_any_depth():
    graph, _ = _if_model()
    tensors = list(constant_tensors(graph))
    # w, the Constant's value (2.0) in `then`, inner_init in both branches of the nested If
    assert sorted(t.name for t in tensors if t.name) == ["inner_init", "inner_init", "w"]
    assert len(tensors) == 4 and any(numpy_helper.to_array(t).tolist() == [2.0] for t in tensors)


def test_labels():
    graph, node = _if_model()
    assert label(node) == "If@y"  # unnamed: op and first output
    assert label(helper.make_node("Conv", ["a", "b"], ["c"], name="conv1")) == "conv1"
    assert label(helper.make_node("Relu", [], [])) == "Relu@?"
