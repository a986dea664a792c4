"""The evaluation library and its command line are separate layers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import calopc.eval

EVAL_DIR = Path(calopc.eval.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved inside calopc.eval)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ["calopc", "eval"][: max(0, 2 - (node.level - 1))] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_library_modules_import_no_command_line_conventions():
    offenders = {}
    for path in sorted(EVAL_DIR.glob("*.py")):
        if path.name == "cli.py":  # the deprecated alias of calopc.cli.eval
            continue
        bad = {m for m in _imports(path) if m == "argparse" or m.startswith("calopc.cli.options")}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_importing_the_library_loads_no_command_line_module():
    mods = [f"calopc.eval.{p.stem}" for p in sorted(EVAL_DIR.glob("*.py")) if p.stem not in ("__init__", "cli")]
    code = ("import importlib, json, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('calopc.cli') or m == 'argparse')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_old_command_line_paths_are_deprecated_aliases():
    import calopc.cli.eval as new

    sys.modules.pop("calopc.eval.cli", None)
    with pytest.warns(DeprecationWarning, match="calopc.cli.eval"):
        import calopc.eval.cli as old
    assert old is new
    from calopc.eval import compare

    with pytest.warns(DeprecationWarning, match="register_compare"):
        assert compare.register is new.register_compare
    with pytest.raises(AttributeError):
        compare.no_such_name  # noqa: B018


def test_compare_command_defaults_to_the_leaderboard_metrics():
    from calopc.cli import build_parser
    from calopc.eval.compare import LEADERBOARD_METRICS

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = build_parser("compare").parse_args(["compare", "ref.hdf5", "gen.hdf5", "-o", "out"])
    assert tuple(args.metrics.split(",")) == LEADERBOARD_METRICS
