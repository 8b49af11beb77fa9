"""The repository's import graph has no circles: each file can be read after the files it imports, and none
imports one that imports it back (model.py and fast_decode.py, then fast.py, once did). Every import counts, also
one inside a function, read from the files' syntax trees, not by running them."""

import ast
import os

REPO = os.path.dirname(os.path.abspath(__file__))


def import_graph():
    """{module: the repository's modules it imports} for every top-level .py file of the repository."""
    modules = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py")}
    graph = {}
    for name in modules:
        tree = ast.parse(open(os.path.join(REPO, f"{name}.py"), encoding="utf-8").read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & modules - {name}
    return graph


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, stack = {}, []   # state: 1 while on the current path, 2 when done

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        stack.pop()
        return None
    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_no_import_circles():
    graph = import_graph()
    assert {"model", "fast_decode", "recipes", "train", "dials", "checkpoint"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert graph["fast_decode"] == set() and graph["configurator"] == set()   # the leaves model.py and every script use
    assert graph["recipes"] == {"model"}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
