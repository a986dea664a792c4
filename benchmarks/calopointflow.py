r"""CaloPointFlow II before and after the published tricks: ``benchmarks/models.py`` with two entries.

Kept so that older instructions still work; every option of ``benchmarks/models.py`` applies, and
``--variant I|II`` trains that one variant only::

    python benchmarks/calopointflow.py --time-limit 240 --out bench_calopointflow
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import main  # noqa: E402

#: today's CaloPointFlow II against the published recipe (CDF dequantisation, DeepSetFlow, α free)
ENTRIES = ["cpf-II-old=calopointflow:alpha=model,set_summary=false,dequantisation=uniform", "cpf-II=calopointflow"]


def _argv(argv: list[str]) -> list[str]:
    out, entries = [], ENTRIES
    it = iter(argv)
    for a in it:
        if a == "--variant" or a.startswith("--variant="):
            v = a.partition("=")[2] or next(it, "")
            entries = [f"cpf-{v}=calopointflow:variant={v}"]
        else:
            out.append(a)
    return out if "--entries" in out else [*out, "--entries", *entries]


if __name__ == "__main__":
    raise SystemExit(main(_argv(sys.argv[1:])))
