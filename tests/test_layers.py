"""The data layer imports downwards only: no module imports one above it, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import calopc

ROOT = Path(calopc.__file__).parent

#: lowest first; a module may import only modules of its own or a lower layer
LAYERS = [
    {"_version", "_extras", "locking", "progress", "geometry", "_h5direct"},
    {"_safety"},
    {"hdf5"},
    {"synth", "converters.sources", "converters.core", "converters.validate"},
    {"converters.files"},
    {"converters.dataset"},
    {"converters.api"},
    {"converters.showerdata"},
    {"converters", "io"},
    {"demo"},
]


def _imports(mod: str) -> set[str]:
    """Every calopc module that ``mod`` imports, at module level or inside functions (relative imports resolved)."""
    path = ROOT / (mod.replace(".", "/") + ("/__init__.py" if (ROOT / mod.replace(".", "/")).is_dir() else ".py"))
    pkg = mod.split(".")[:-1] if not path.name == "__init__.py" else mod.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                names = [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
            elif node.module and node.module.startswith("calopc."):
                names = [node.module[len("calopc."):]]
            else:
                continue
            out.update(n.strip(".") for n in names)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("calopc."):] for a in node.names if a.name.startswith("calopc."))
    return {m for m in out if m}


def _layer(mod: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if mod in layer:
            return i
    return None


def test_data_layer_modules_import_only_downwards():
    upward = []
    for i, layer in enumerate(LAYERS):
        for mod in layer:
            for dep in _imports(mod):
                j = _layer(dep)
                if j is None:
                    upward.append(f"{mod} -> {dep} (outside the data layer)")
                elif j > i or (j == i and dep != mod):
                    upward.append(f"{mod} -> {dep}")
    assert not upward, upward


def test_file_and_dataset_readers_do_not_import_each_other():
    assert "converters.dataset" not in _imports("converters.files")
    assert "converters.api" not in _imports("converters.dataset")
    assert "converters.files" in _imports("converters.dataset")
