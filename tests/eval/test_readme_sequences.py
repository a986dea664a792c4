"""The README's evaluation command sequences run as written (sample sizes and training lengths scaled down)."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from calopc.cli import main

pytest.importorskip("torch")
pytest.importorskip("sklearn")

#: the "Evaluation" block of the README, one command per entry, as a user types them
EVALUATION = [
    "calopc synth ref.hdf5 -n 5000 --seed 1",
    "calopc synth gen.hdf5 -n 5000 --seed 2",
    "calopc evaluate gen.hdf5 ref.hdf5 -o report/ --cls-epochs 10 --cls-hidden 512",
    "calopc evaluate -i gen.hdf5 -r ref.hdf5 -m all -d 2 --output_dir report/",
    "calopc compare ref.hdf5 cpf=gen_cpf.hdf5 cc=gen_cc.hdf5 -o compare/",
]
#: the "Models" block's evaluation after the "Evaluation" block's reference: 10,000 generated vs 5,000 reference
MODELS_THEN_EVALUATE = [
    "calopc synth ref.hdf5 -n 5000 --seed 1",
    "calopc generate runs/cc-cm -n 10000 --energies log-uniform:1e3:1e6 -o gen.hdf5",
    "calopc evaluate gen.hdf5 ref.hdf5 -o report/",
]
#: inputs the README makes elsewhere (trained models), stood in for by synthetic samples of the same size
STAND_INS = {
    "calopc generate runs/cc-cm -n 10000 --energies log-uniform:1e3:1e6 -o gen.hdf5":
        "calopc synth gen.hdf5 -n 10000 --seed 3",
}
PREPARE = {"calopc compare": ["calopc synth gen_cpf.hdf5 -n 5000 --seed 4", "calopc synth gen_cc.hdf5 -n 5000 --seed 5"]}
SCALE = 50  # showers: -n N becomes N / SCALE
#: appended to each command (the last value of an option wins): short trainings, small batches, drawing in-process
FAST = {
    "evaluate": ["--cls-epochs", "1", "--cls-hidden", "16", "--cls-seeds", "1", "--fpd-min-samples", "100",
                 "--kpd-batch-size", "100", "--test-permutations", "19", "--plot-workers", "1", "--no-progress"],
    "compare": ["--runs", "1", "--epochs", "1", "--hidden", "16", "--cls-epochs", "1", "--cls-hidden", "16",
                "--fpd-min-samples", "100", "--kpd-batch-size", "100", "--device", "cpu", "--no-progress"],
}


def _argv(command: str) -> list[str]:
    command = STAND_INS.get(command, command)
    words = shlex.split(command)
    assert words[0] == "calopc", command
    args = words[1:]
    for i, w in enumerate(args[:-1]):
        if w == "-n":
            args[i + 1] = str(int(args[i + 1]) // SCALE)
    return args + FAST.get(args[0], [])


def _run(commands: list[str], capsys, monkeypatch) -> list[str]:
    import importlib

    ev = importlib.import_module("calopc.eval.evaluate")  # the module (the package exports a function of that name)

    # the figures are tested elsewhere (tests/eval/test_plots.py, test_report.py); ~100 s of CPU per dataset-2
    # report here, so these runs write the report without them
    monkeypatch.setattr(ev, "_make_plots", lambda *args, **kwargs: ({}, {}, {}))
    errs = []
    for command in commands:
        for extra in PREPARE.get(" ".join(command.split()[:2]), []):
            assert main(_argv(extra)) == 0, extra
        rc = main(_argv(command))
        cap = capsys.readouterr()
        assert rc == 0, (command, cap.err)
        errs.append(cap.err)
    return errs


@pytest.mark.slow
def test_readme_evaluation_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run(EVALUATION, capsys, monkeypatch)
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert m["n_generated"] == m["n_reference"] == 5000 // SCALE and set(m["classifier"]) == {"low", "high"}
    c = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [r["name"] for r in c["leaderboard"]] == ["cpf", "cc"]


@pytest.mark.slow
def test_readme_models_block_evaluates_more_generated_than_reference_showers(tmp_path, monkeypatch, capsys):
    """10,000 generated showers against the 5,000 of the reference: the classifiers take the first 5,000 of each,
    with one line saying so; nothing is refused."""
    monkeypatch.chdir(tmp_path)
    errs = _run(MODELS_THEN_EVALUATE, capsys, monkeypatch)
    n_ref = 5000 // SCALE
    assert re.search(rf"warning: the classifiers compare samples of equal size .*the first {n_ref} showers", errs[-1])
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert (m["n_generated"], m["n_reference"]) == (10000 // SCALE, n_ref)
    for c in m["classifier"].values():
        assert c["n_train"] == 2 * int(0.6 * n_ref)
