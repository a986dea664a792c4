"""The documentation site: it builds with warnings as errors, executes the notebooks and opens offline."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .pages import DOCS, ROOT, env


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The HTML site built from docs/ (sphinx -W --keep-going), the example notebooks executed once."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    out = tmp_path_factory.mktemp("site")
    cache = tmp_path_factory.mktemp("jupyter_cache")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-d", str(out / ".doctrees"),
           "-D", f"nb_execution_cache_path={cache}", str(DOCS), str(out / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=2400)
    if proc.returncode != 0:
        pytest.fail(f"the documentation build failed or warned (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return out / "html"


def test_docs_build_without_warnings(site):
    """Every page is built, with the API reference of the public modules generated from the docstrings."""
    for name in ("index", "getting-started", "data", "interop", "evaluation", "display", "sparse", "geant4", "cli",
                 "api", "changelog", "citing", "development", "benchmarks", "models/index", "models/calopointflow",
                 "models/caloclouds", "models/deeptree", "models/fidelity"):
        assert (site / f"{name}.html").exists(), name
    api = (site / "generated" / "calopc.download.html").read_text()
    assert "select_files" in api and "DownloadError" in api
    assert "calibrated_tests" in (site / "generated" / "calopc.eval.distances.html").read_text()
    assert "iterate_sparse" in (site / "generated" / "calopc.hdf5.html").read_text()


def test_cli_reference_lists_every_command(site):
    """The command-line reference holds the --help text of every command of the parser."""
    from calopc.cli import COMMANDS

    text = (site / "cli.html").read_text()
    for name in COMMANDS:
        assert f'id="cli-{name}"' in text, name
    assert "--mirror" in text and "--max-showers" in text


def test_notebooks_are_rendered_with_outputs(site):
    """Every example notebook is in the site and was executed: its code cells have outputs."""
    notebooks = sorted((ROOT / "examples").glob("*.ipynb"))
    assert len(notebooks) >= 3
    for nb in notebooks:
        html = (site / "examples" / f"{nb.stem}.html").read_text()
        assert html.count('class="cell_output') >= 3, nb.name
        assert "Traceback" not in html, nb.name


def test_site_opens_offline(site):
    """No page loads a script, stylesheet, font or image from the network."""
    remote = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)
    bad = []
    for page in site.rglob("*.html"):
        bad += [f"{page.relative_to(site)}: {m.group(0)}" for m in remote.finditer(page.read_text())]
    for css in site.rglob("*.css"):
        bad += [f"{css.relative_to(site)}: {u}" for u in re.findall(r"url\(['\"]?(https?://[^)'\"]+)", css.read_text())]
    assert not bad, bad[:10]
