"""Dependencies point one way: config <- model <- parallel <- training and inference (checkpoint beside them).

Every module's imports are parsed (including imports inside functions) and each import of another
package of longctx_megatron must be allowed by LAYERS; an upward import fails with its file and line.
"""

from __future__ import annotations

import ast
import pathlib

import longctx_megatron

PACKAGE = pathlib.Path(longctx_megatron.__file__).parent

# Package (or top-level module) -> what it may import besides itself. data/ sits beside model/ on
# top of config/; checkpoint/ sits beside training/ and may not import it.
LAYERS = {
    "atomic_file": set(),
    "packing": set(),
    "config": {"atomic_file"},
    "data": {"config", "atomic_file", "packing"},
    "model": {"config", "packing"},
    "parallel": {"config", "model"},
    "checkpoint": {"config", "model", "parallel", "atomic_file"},
    "memory": {"config", "model", "parallel", "inference"},
    "training": {"config", "data", "model", "parallel", "checkpoint", "memory", "atomic_file", "packing"},
    "inference": {"config", "data", "model", "parallel", "checkpoint", "atomic_file"},
    "eval": {"config", "data", "model", "parallel", "checkpoint", "inference", "atomic_file"},
}


def _layer(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_layers(tree: ast.AST):
    """(line, layer) of every import of a package of longctx_megatron; relative imports are refused
    (layer "relative"), since they would hide which package is imported."""
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            yield node.lineno, "relative"
        elif isinstance(node, ast.ImportFrom) and node.module == "longctx_megatron":
            names = [f"longctx_megatron.{alias.name}" for alias in node.names]  # from longctx_megatron import data
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "longctx_megatron" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_package_has_a_layer():
    packages = {_layer(path) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py" or path.parent != PACKAGE}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS"


def test_no_module_imports_a_layer_above_it():
    violations = []
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the walk found the package
    for path in modules:
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        layer = _layer(path)
        for line, imported in _imported_layers(ast.parse(path.read_text(), str(path))):
            if imported != layer and imported not in LAYERS[layer]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {layer} imports {imported}")
    assert not violations, "upward (or relative) imports:\n" + "\n".join(violations)


def test_the_check_sees_each_form_of_import():
    forms = ast.parse("from longctx_megatron import training\nimport longctx_megatron.parallel.state\n"
                      "from longctx_megatron.checkpoint.keys import model_key\nfrom . import x\n")
    assert [layer for _, layer in _imported_layers(forms)] == ["training", "parallel", "checkpoint", "relative"]
