"""The model library stands below the command line: no argparse, no option types of ``calopc.cli``."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import calopc.models

MODELS = Path(calopc.models.__file__).parent
#: deprecated aliases of names that moved to calopc.cli.models (they import it, nothing else of calopc.cli)
ALIASES = {"cli.py", "distill.py"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``."""
    out = []
    package = ["calopc", "models", *path.relative_to(MODELS).parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            out.append((node.lineno, ".".join([*base, node.module or ""]).strip(".")))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def test_model_modules_import_neither_argparse_nor_the_command_line():
    offenders = []
    for f in sorted(MODELS.rglob("*.py")):
        for line, name in _imports(f):
            rel = str(f.relative_to(MODELS))
            command_line = name == "calopc.cli" or name.startswith("calopc.cli.")
            if name == "argparse" or (command_line and (rel not in ALIASES or not name.startswith("calopc.cli.models"))):
                offenders.append(f"{rel}:{line} {name}")
    assert offenders == []


def test_old_command_line_names_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    import calopc.cli.models as new
    from calopc.models import distill

    sys.modules.pop("calopc.models.cli", None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = importlib.import_module("calopc.models.cli")
        reg = distill.register
    assert old.register is new.register and old.resolve_train_args is new.resolve_train_args
    assert reg is new._register_distill
    assert sum(issubclass(x.category, DeprecationWarning) for x in w) == 2
