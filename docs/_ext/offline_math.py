"""Sphinx extension: math shown as its TeX source in plain HTML, so no page loads MathJax from a CDN.

The documentation must open offline (``docs/_build/html`` copied to a laptop or a cluster without
network). Sphinx's default math renderer, MathJax, is fetched from a CDN; this renderer writes
``$...$`` source text in ``<span class="math">`` instead (the pages use Unicode symbols for their
formulas, so little is lost).
"""

from __future__ import annotations

from html import escape


def _inline(self, node) -> None:  # noqa: ANN001
    self.body.append(f'<span class="math notranslate">{escape(node.astext())}</span>')
    raise __import__("docutils").nodes.SkipNode


def _block(self, node) -> None:  # noqa: ANN001
    self.body.append(f'<pre class="math notranslate">{escape(node.astext())}</pre>\n')
    raise __import__("docutils").nodes.SkipNode


def setup(app):  # noqa: ANN001, ANN201
    app.add_html_math_renderer("offline", (_inline, None), (_block, None))
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
