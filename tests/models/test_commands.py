"""What train and generate show the user: bad input answered with one line (exit 2) and nothing left behind
(input files without showers, malformed config files, option values of any length), whole example commands
in their help, and a training's progress that knows its time limit."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from calopc.cli import main


def _one_line(err: str, cmd: str) -> str:
    lines = [x for x in err.strip().splitlines() if x]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"calopc {cmd}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.fixture
def empty_inputs(tmp_path, toy_parquet):
    """An HDF5 shower file and a points Parquet file, both without showers."""
    h5 = tmp_path / "zero.hdf5"
    with h5py.File(h5, "w") as f:
        f["incident_energies"] = np.zeros((0, 1))
        f["showers"] = np.zeros((0, 6480))          # a dataset-2 file
    parquet = tmp_path / "zero.parquet"
    pq.write_table(pq.read_table(toy_parquet).slice(0, 0), parquet)
    return h5, parquet


@pytest.mark.parametrize("kind", ["hdf5", "parquet"])
def test_generate_refuses_energies_from_a_file_without_showers(toy_run, empty_inputs, tmp_path, capsys, kind):
    src = empty_inputs[kind == "parquet"]
    out = tmp_path / "gen.hdf5"
    assert main(["generate", str(toy_run), "--energies", str(src), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err, "generate")
    assert f"--energies {src}: holds no showers" in line
    assert "showers/s" not in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero.hdf5", "zero.parquet"]   # no output left


def test_generate_without_energies_is_refused_before_any_output(toy_run, tmp_path):
    from calopc.models.generate import generate

    with pytest.raises(ValueError, match="no incident energies"):
        generate(toy_run, np.zeros(0), output=tmp_path / "gen.hdf5", device="cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "text", "where"), [
    ("bad.yaml", "model:\n  latent: [1, 2\n", "not valid YAML at line 3, column 1: expected ',' or ']'"),
    ("tab.yml", "model: {latent: 4}\n\ttrain: x\n", "not valid YAML at line 2, column 1"),
    ("trunc.json", '{"model": {"sigma_data": 0.5}', "not valid JSON at line 1, column 30: Expecting ',' delimiter"),
])
def test_malformed_config_files_are_one_line_naming_file_and_position(toy_parquet, tmp_path, capsys, name, text,
                                                                      where):
    cfg = tmp_path / name
    cfg.write_text(text)
    assert main(["train", "caloclouds", "--data", str(toy_parquet), "-o", str(tmp_path / "run"), "--config", str(cfg),
                 "--dry-run"]) == 2
    line = _one_line(capsys.readouterr().err, "train")
    assert line.startswith(f"calopc train: error: --config {cfg}: {where}"), line


@pytest.mark.parametrize("item", ["model.denoiser={}", "train.optimizer={}"])
def test_long_option_values_are_cut_in_error_lines(toy_parquet, tmp_path, capsys, item):
    value = "x" * 100_000
    assert main(["train", "caloclouds", "--data", str(toy_parquet), "-o", str(tmp_path / "run"),
                 "--set", item.format(value), "--dry-run"]) == 2
    line = _one_line(capsys.readouterr().err, "train")
    assert len(line) < 250 and "'" + "x" * 60 + "...' (100,000 characters)" in line, line


def test_energies_from_parquet_raise_no_warning(toy_run, toy_parquet, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # e.g. torch's "The given NumPy array is not writable"
        assert main(["generate", str(toy_run), "--energies", str(toy_parquet), "-n", "3", "-o",
                     str(tmp_path / "g.hdf5"), "--device", "cpu", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("cmd", "example"), [
    ("train", ["calopc train calopointflow --data train.parquet -o runs/cpf \\",
               "--steps 20000 --batch-size 128 --device cuda"]),
    ("generate", ["calopc generate runs/cpf --energies reference.hdf5 -o generated.hdf5 \\", "--device cuda"]),
])
def test_help_shows_the_example_as_whole_command_lines(monkeypatch, capsys, cmd, example):
    monkeypatch.setenv("COLUMNS", "60")                  # a narrow terminal
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    lines = [x.strip() for x in capsys.readouterr().out.splitlines()]
    i = lines.index("example:")
    assert lines[i + 1:i + 1 + len(example)] == example


# ---------------------------------------------------------------------------------------------- progress
_MADE: list = []


class _Recorder:
    """A stand-in for calopc.progress.Progress that keeps its keywords."""

    def __init__(self, total=None, desc="", **kw):
        self.total, self.desc, self.kw = total, desc, kw
        _MADE.append(self)

    def update(self, n=1, **postfix):
        pass

    def set_postfix(self, **postfix):
        pass

    def close(self):
        pass


def test_training_progress_knows_the_time_limit(toy_parquet, tmp_path, monkeypatch):
    import calopc.progress
    from calopc.models.train import train, train_config

    from .conftest import TINY

    monkeypatch.setattr(calopc.progress, "Progress", _Recorder)
    cfg = train_config("calopointflow", steps=2, batch_size=8, time_limit=65.0, device="cpu")
    train("calopointflow", toy_parquet, tmp_path / "run", model_config=TINY, config=cfg)
    assert _MADE[-1].kw["time_limit"] == 65.0      # the ETA is then at most the time left
