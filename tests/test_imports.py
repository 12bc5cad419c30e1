"""The package's import graph, read from the source (ast; nothing imported). Every import
statement counts, those inside functions too: a deferred import is still a dependency. Only
the imports under `if TYPE_CHECKING:` are left out: they never run, and annotations may name a
class from a module that itself imports this one.

The layers, from the bottom; a module imports only from its own layer or below:

    0  parallel, data, models, perf,     (devices, inputs, networks, FLOP counts,
       mesh_axes                          the mesh axis names without jax)
    1  whitebox                          (coding rate, sparsity, segmentation, figures)
    2  evals                             (evaluators: they never see a task)
    3  tasks, config_utils               (model + data + loss + evaluators)
    4  train, config_check               (the one loop, the step, checkpoints)
    5  the tools                         (main, plan, evaluate, analyze, generate, convert,
                                          inference, study, configs)

and no two files import each other, directly or around a circle. An import counts against the
file it names: `from crate_jax.tasks.base import Task` against tasks/base.py, `from crate_jax
import tasks` against tasks/__init__.py (which imports every task). The package root's lazy
`crate_jax.load` (the public façade over inference) is not counted.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "crate_jax"
LAYERS = {"parallel": 0, "data": 0, "models": 0, "perf": 0, "mesh_axes": 0, "whitebox": 1,
          "evals": 2, "tasks": 3, "config_utils": 3, "train": 4, "config_check": 4}
TOOL = 5


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, pathlib.Path]:
    """Every module of the package by name (configs/ is a link to the repository's configs,
    which are tools: they are walked like the rest)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or typing.TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _imported(path: pathlib.Path) -> set[str]:
    """The crate_jax names a file imports (modules and `module.name`), relative imports
    resolved, TYPE_CHECKING-only imports left out."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c`: the module a.b.c when c is one, otherwise a name in a.b
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in out if name == "crate_jax" or name.startswith("crate_jax.")}


def _targets(name: str, files: dict[str, pathlib.Path]) -> set[str]:
    """The file an imported name lives in: the longest prefix that is a module (a package
    named itself, `from crate_jax import tasks`, is its __init__)."""
    parts = name.split(".")
    for end in range(len(parts), 1, -1):
        prefix = ".".join(parts[:end])
        if prefix in files:
            return {prefix}
    return set()


def _graph() -> dict[str, set[str]]:
    files = _files()
    return {m: {t for name in _imported(p) for t in _targets(name, files) if t != m}
            for m, p in files.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOOL) if len(parts) > 1 else TOOL


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one file (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_every_import_points_down_the_layers():
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in sorted(_graph().items()) for t in sorted(targets)
              if _layer(t) > _layer(m)]
    assert upward == []


def test_no_circle_between_files():
    assert _cycles(_graph()) == []


def test_the_checks_can_fail():
    """The reader sees absolute, `from crate_jax import x`, relative and lazy imports, the
    graph names files, and the cycle finder finds a planted circle."""
    assert "crate_jax.models.state.merge_model" in _imported(PACKAGE / "evals" / "embedding.py")
    graph = _graph()
    assert "crate_jax.evals.base" in graph["crate_jax.evals.zeroshot"]
    assert "crate_jax.data.pipeline" in graph["crate_jax.data.image_text"]  # a lazy import
    assert "crate_jax.tasks" in graph["crate_jax.train.state"]  # the package's __init__
    assert "crate_jax.models.layer_stack" in graph["crate_jax.models.registry"]  # from-a-package
    assert _layer("crate_jax.analyze") == TOOL and _layer("crate_jax.evals.probe") == 2
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(planted) == [["a", "b", "c"]]
    wds = PACKAGE / "data" / "wds" / "state.py"  # imports the reader for annotations only
    assert "TYPE_CHECKING" in wds.read_text()
    assert "crate_jax.data.wds.reader" not in graph["crate_jax.data.wds.state"]
