"""The package's layers, read from the source (ast; nothing imported): each layer imports only
layers below it, so there is no import cycle such as train → tasks → evals → train.

    models                      (the networks and their state)
    tasks, evals                (what to train and measure)
    train                       (the loop, the step, checkpoints)
    plan, main                  (command lines)
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "crate_jax"

# layer → the crate_jax subpackages/modules it must not import (anywhere in the file, inside
# functions too: a lazy import is still a dependency)
FORBIDDEN = {
    "models": {"tasks", "evals", "train", "plan", "main"},
    "tasks": {"train", "plan", "main"},
    "evals": {"train", "plan", "main"},
    "train": {"plan", "main"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: pathlib.Path) -> set[str]:
    """The crate_jax modules a file imports, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in out if name == "crate_jax" or name.startswith("crate_jax.")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(layer: str) -> list[str]:
    out = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in sorted(_imported(path)):
            if _layer(name) in FORBIDDEN[layer]:
                out.append(f"{_module_name(path)} imports {name}")
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    assert (PACKAGE / layer).is_dir()
    assert _violations(layer) == []


def test_the_import_reader_sees_imports():
    """The checks above would pass vacuously if the reader missed imports: it finds the
    known ones (absolute, `from crate_jax import x`, and lazy inside a function)."""
    assert "crate_jax.models.state.merge_model" in _imported(PACKAGE / "evals" / "embedding.py")
    assert "crate_jax.tasks.base" in _imported(PACKAGE / "evals" / "zeroshot.py")
    assert "crate_jax.data.pipeline" in _imported(PACKAGE / "data" / "image_text.py")  # lazy
    assert "crate_jax.tasks" in _imported(PACKAGE / "train" / "state.py")
