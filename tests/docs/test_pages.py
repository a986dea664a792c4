"""The README and the user-guide pages: every command block runs, in order, on small synthetic data."""

from __future__ import annotations

import pytest

from .pages import ROOT, Block, blocks, page_id, pages, run_page, shell_script

GUIDE = [p for p in pages() if "models" not in p.relative_to(ROOT).parts]


@pytest.mark.parametrize("page", GUIDE, ids=page_id)
def test_page_commands_run(page, tmp_path):
    """Every bash and python block of the page runs, in order, in one folder, on small synthetic data."""
    pytest.importorskip("torch")
    for note in run_page(page, tmp_path):
        print(note)


def test_blocks_are_found_and_marked():
    """The parser sees the README's blocks and its real-data mark, and rewrites downloads into synth."""
    bs = blocks(ROOT / "README.md")
    assert bs[0].lang == "bash" and "make demo" in bs[0].text and "make test" in bs[0].text
    real = [b for b in bs if b.mark == "real-data"]
    assert real and all("calopc download" in b.text for b in real)
    script = shell_script(real[0])
    assert "calopc download" not in script
    assert "calopc synth data/dataset_3_1.hdf5 -d 3 -n 50" in script
    assert "make demo" not in shell_script(bs[0])


def test_sizes_are_capped():
    """Sizes, steps and devices of the pages are reduced before a block runs; small sizes are kept."""
    assert shell_script(Block("bash", "calopc train m --steps 20000 -n 5000 --device cuda\n", 1)) == \
        "calopc train m --steps 2 -n 50 --device cpu --batch-size 8\n"
    assert shell_script(Block("bash", "calopc distill runs/cc -o runs/cm\n", 1)) == \
        "calopc distill runs/cc -o runs/cm --steps 2 --batch-size 8\n"
    assert shell_script(Block("bash", "calopc synth hg.hdf5 -n 20\n", 1)) == "calopc synth hg.hdf5 -n 20\n"
    quick = shell_script(Block("bash", "calopc evaluate g.hdf5 r.hdf5 -o rep/ --cls-epochs 10\n", 1))
    assert "--cls-epochs 1 " in quick and "--metrics hist,fpd,kpd,cls-high" in quick
    official = shell_script(Block("bash", "calopc evaluate -i g.hdf5 -r r.hdf5 -m hist -d 2\n", 1))
    assert official == "calopc evaluate -i g.hdf5 -r r.hdf5 -m hist -d 2\n"
    assert shell_script(Block("bash", "pip install 'calopc[export]'\ncalopc info x.hdf5\n", 1)) == "calopc info x.hdf5\n"
    setup = Block("bash", "calopc info ds3.hdf5\n", 1, mark="setup", reason="calopc synth ds3.hdf5 -d 3 -n 5000")
    assert shell_script(setup) == "calopc synth ds3.hdf5 -d 3 -n 50\ncalopc info ds3.hdf5\n"


def test_page_blocks_are_runnable_languages():
    """Every page block is bash, python or a data/text block: no command escapes the tests by its language."""
    bad = [f"{page_id(p)}:{b.line}: {b.lang}" for p in pages() for b in blocks(p)
           if b.lang not in ("bash", "python", "text", "toml", "yaml", "json")]
    assert not bad, bad
