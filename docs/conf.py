"""Sphinx configuration of the calopc documentation (``make docs``: HTML in docs/_build/html)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))
if str(ROOT) not in sys.path:  # the checkout's calopc, also when it is not installed
    sys.path.insert(0, str(ROOT))

import calopc  # noqa: E402

project = "calopc"
author = "the calopc developers"
copyright = "the calopc developers, BSD-3-Clause"  # noqa: A001
release = version = calopc.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "calopc_cli",
    "offline_math",
]

# ----------------------------------------------------------------------------- sources
exclude_patterns = ["_build", "_generated", "_templates", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary writes its stubs as .rst
root_doc = "index"

# The notebooks live in examples/ (run there by the tests and by users); the docs render a copy.
_EXAMPLES = HERE / "examples"
_EXAMPLES.mkdir(exist_ok=True)
for _nb in sorted((ROOT / "examples").glob("*.ipynb")):
    _dst = _EXAMPLES / _nb.name
    if not _dst.exists() or _dst.read_bytes() != _nb.read_bytes():
        shutil.copyfile(_nb, _dst)

# ----------------------------------------------------------------------------- MyST and notebooks
myst_enable_extensions = ["colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3
# notebooks run once per build on synthetic data, in a temporary folder; outputs are cached by
# jupyter-cache in _build/.jupyter_cache, so a rebuild re-runs only the notebooks that changed
nb_execution_mode = "cache"
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_execution_in_temp = True
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# ----------------------------------------------------------------------------- API reference
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shapes", "notes_style"), ("References", "notes_style")]

# ----------------------------------------------------------------------------- HTML: offline, no CDN
html_theme = "furo"
html_title = f"calopc {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
# the pages open offline: math as plain text instead of MathJax from a CDN (_ext/offline_math.py)
html_math_renderer = "offline"
