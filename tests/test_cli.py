from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from calopc.cli import main


def test_synth_convert_info_voxelize(tmp_path, capsys):
    src = tmp_path / "s.hdf5"
    assert main(["synth", str(src), "-d", "1-pions", "-n", "40", "--seed", "3", "--no-progress"]) == 0
    assert main(["convert", str(src), "--no-progress"]) == 0
    pq = tmp_path / "s.parquet"
    assert pq.exists()
    capsys.readouterr()
    assert main(["info", str(pq), "--json", "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dataset"] == "1-pions" and info["n_showers"] == 40
    assert main(["info", str(src), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "dataset 1-pions (533 voxels), 40 showers" in text and "hits/shower" in text
    back = tmp_path / "b.hdf5"
    assert main(["voxelize", str(pq), "-o", str(back), "--collisions", "nearest-free", "--no-progress"]) == 0
    with h5py.File(src) as a, h5py.File(back) as b:
        assert np.array_equal(a["showers"][:], b["showers"][:])


def test_cli_errors_are_one_line(tmp_path, capsys):
    p = tmp_path / "bad.hdf5"
    with h5py.File(p, "w") as f:
        f["incident_energies"] = np.ones((2, 1))
    assert main(["convert", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("calopc convert: error: ")
    assert "dataset 'showers' not found" in err and "Traceback" not in err
    assert main(["info", str(tmp_path / "nope.hdf5")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_validates_choices(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "x.hdf5", "-d", "4"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synth", "x.hdf5", "-n", "0"])


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, calopc, calopc.converters, calopc.cli; calopc.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- the package layout
def _modules_after(code: str) -> set[str]:
    import subprocess
    import sys

    prog = ("import sys, json\nfrom calopc.cli import main\ntry:\n    " + code +
            "\nexcept SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_root_help_imports_no_command_module():
    mods = _modules_after("main(['--help'])")
    assert not {"numpy", "calopc.cli.data", "calopc.cli.eval", "calopc.cli.models", "calopc.io", "calopc.hdf5",
                "calopc._safety"} & mods


def test_a_command_imports_only_its_own_module():
    mods = _modules_after("main(['info', '--help'])")
    assert "calopc.cli.data" in mods
    assert not {"calopc.cli.eval", "calopc.cli.models", "torch"} & mods
    mods = _modules_after("main(['train', '--help'])")
    assert "calopc.cli.models" in mods and not {"calopc.cli.data", "calopc.cli.eval", "torch"} & mods


def test_command_table_matches_the_registered_commands():
    from calopc.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(COMMANDS) == set(sub.choices)
    for name, (module, text) in COMMANDS.items():
        assert helps[name] == text, name
        assert sub.choices[name]._defaults["func"].__module__.startswith(module.rsplit(".", 1)[0]), name
    assert list(helps) == list(COMMANDS)  # calopc --help lists them in the table's order


def test_command_modules_import_only_the_options_module_of_the_root():
    """Sub-command modules stand below the root: they take option types from calopc.cli.options only."""
    import ast

    import calopc

    root = Path(calopc.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        if f.parent == root / "cli" or f == root / "__main__.py":  # the root itself and 'python -m calopc'
            continue
        pkg = ".".join(f.relative_to(root.parent).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                name = ".".join([*base, node.module or ""]).strip(".")
                if name == "calopc.cli" or (name == "calopc" and any(a.name == "cli" for a in node.names)):
                    offenders.append(f"{f.relative_to(root)}:{node.lineno}")
            elif isinstance(node, ast.Import):
                offenders += [f"{f.relative_to(root)}:{node.lineno}" for a in node.names if a.name == "calopc.cli"]
    assert offenders == []


def test_python_dash_m_calopc_cli():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "calopc.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("calopc ")
    r = subprocess.run([sys.executable, "-m", "calopc", "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'nonsense'" in r.stderr
