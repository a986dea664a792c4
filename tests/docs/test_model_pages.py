"""The model pages: every training, distillation and generation command runs (two steps each)."""

from __future__ import annotations

import pytest

from .pages import ROOT, page_id, pages, run_page

MODEL_PAGES = [p for p in pages() if "models" in p.relative_to(ROOT).parts]


@pytest.mark.parametrize("page", MODEL_PAGES, ids=page_id)
def test_model_page_commands_run(page, tmp_path):
    """Every bash and python block of the page runs, in order, in one folder, on small synthetic data."""
    pytest.importorskip("torch")
    pytest.importorskip("zuko")
    for note in run_page(page, tmp_path):
        print(note)
