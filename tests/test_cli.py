from __future__ import annotations

import json

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
