"""The graph IR: tracing JAX functions into networkx-backed dataflow graphs, and running them."""

from meshwright.ir.graph import Graph, GraphError, Literal, Node, Value, format_aval
from meshwright.ir.interpreter import InterpretError, eval_graph
from meshwright.ir.trace import UnsupportedError, graph_from_jaxpr, trace

__all__ = ["Graph", "GraphError", "InterpretError", "Literal", "Node", "UnsupportedError",
           "Value", "eval_graph", "format_aval", "graph_from_jaxpr", "trace"]
