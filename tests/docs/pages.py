"""Running the command blocks of the README and of docs/ (the helpers of the tests in this folder).

Each page's ```` ```bash ```` and ```` ```python ```` blocks run in order, in one temporary folder per
page, as a reader would type them, on small synthetic data:

* sizes are capped by :data:`SHRINK` (the pages show realistic sizes; the test checks that the
  commands run, not what they produce at full size);
* a block preceded by ``<!-- doc-test: real-data -->`` needs the CaloChallenge files or the network:
  its ``calopc download`` lines become ``calopc synth`` lines writing files of the same names;
* a block preceded by ``<!-- doc-test: skip REASON -->`` is not run (the reason is reported);
* a block preceded by ``<!-- doc-test: setup COMMANDS -->`` runs the (hidden) shell ``COMMANDS`` first, for a
  page that starts from a file its reader already has (``calopc synth ds3.hdf5 -d 3 -n 200 && ...``);
* ``make`` and ``pip install`` lines are not run: they set up the virtualenv (with every extra) and run this
  suite, which CI does itself.

``calopc`` and ``python`` are this interpreter with this checkout first on the path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["DOCS", "ROOT", "SHRINK", "Block", "blocks", "env", "page_id", "pages", "run_page", "shell_script"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
_SKIP_DIRS = {"_build", "_generated", "generated", "examples", "_templates", "_ext"}

#: (pattern, replacement, why): applied to every line of a bash block
SHRINK: list[tuple[str, object, str]] = [
    (r"(?<=\s)-n (\d+)", lambda m: f"-n {min(int(m.group(1)), 50)}", "at most 50 showers per file"),
    (r"--steps (\d+)", lambda m: f"--steps {min(int(m.group(1)), 2)}", "two training steps"),
    (r"--max-showers (\d+)", lambda m: f"--max-showers {min(int(m.group(1)), 50)}", "at most 50 showers"),
    (r"--batch-size (\d+)", lambda m: f"--batch-size {min(int(m.group(1)), 8)}", "batches of at most 8 showers"),
    (r"--cls-epochs (\d+)", "--cls-epochs 1", "classifiers train one epoch"),
    (r"--cls-hidden (\d+)", "--cls-hidden 32", "small classifiers"),
    (r"--epochs (\d+)", "--epochs 1", "one epoch of the multi-class classifier"),
    (r"--hidden (\d+)", "--hidden 32", "a small multi-class classifier"),
    (r"--runs (\d+)", "--runs 1", "one multi-class training"),
    (r"--device cuda", "--device cpu", "no GPU in the tests"),
]
#: options added unless the page sets them: two training or distillation steps in batches of 8 showers; an evaluate or compare
#: without --metrics computes the histograms, FPD/KPD and the high-level classifier only (the plots, the
#: voxel classifiers and the report are tested by tests/eval on their own; here they would take minutes)
_QUICK = {"train": ["--steps 2", "--batch-size 8"], "distill": ["--steps 2", "--batch-size 8"],
          "evaluate": ["--metrics hist,fpd,kpd,cls-high", "--cls-epochs 1", "--cls-hidden 32", "--cls-seeds 1",
                       "--test-permutations 19"],
          "compare": ["--metrics hist,fpd", "--cls-epochs 1", "--cls-hidden 32", "--epochs 1", "--hidden 32",
                      "--runs 1"]}
_MARK = re.compile(r"^<!--\s*doc-test:\s*(real-data|skip|setup)\b\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")


@dataclass
class Block:
    lang: str
    text: str
    line: int
    mark: str = ""
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the doc-test mark on the line before each."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or not m.group(3):
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        body = []
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        mark = _MARK.match(lines[i - 1].strip()) if i > 0 else None
        out.append(Block(lang, "\n".join(body) + "\n", i + 1, mark.group(1) if mark else "",
                         mark.group(2) if mark else ""))
        i = j + 1
    return out


def _synth_for_download(line: str) -> str:
    """``calopc download D --dir X [--files F ...]`` -> ``calopc synth X/F -d D -n 200`` for each file."""
    from calopc.download import FILES, select_files

    words = line.split("#")[0].split()
    dataset = words[2]
    folder = words[words.index("--dir") + 1] if "--dir" in words else "."
    names = None
    if "--files" in words:
        k = words.index("--files") + 1
        names = []
        while k < len(words) and not words[k].startswith("-"):
            names.append(words[k])
            k += 1
    cmds = []
    for f in select_files(dataset, names):
        seed = FILES.index(f) + 100
        cmds.append(f"calopc synth {folder.rstrip('/')}/{f.name} -d {f.dataset} -n 50 --seed {seed} --no-progress")
    return " && ".join(cmds)


def shell_script(block: Block) -> str:
    """The bash text of ``block`` as the test runs it (sizes capped, downloads replaced, make lines dropped)."""
    out = []
    lines = block.text.splitlines()
    if block.mark == "setup":
        lines.insert(0, block.reason)
        block.notes.append(f"set up first: {block.reason}")
    for line in lines:
        s = line.strip()
        if s.startswith(("make ", "pip install ")):
            block.notes.append(f"not run: {s.split('#')[0].strip()} (sets up the virtualenv / runs this suite)")
            continue
        if block.mark == "real-data" and s.startswith("calopc download "):
            line = _synth_for_download(s)
            block.notes.append(f"replaced by synthetic files: {s.split('#')[0].strip()}")
        code, _, comment = line.partition(" #")
        for pattern, repl, _why in SHRINK:
            code = re.sub(pattern, repl, code)
        for cmd, extra in _QUICK.items():
            if re.search(rf"\bcalopc {cmd}\b", code) and not code.rstrip().endswith("\\") and \
                    not re.search(r"\s-m\s", code):  # the official evaluate.py command line has no such options
                code = code.rstrip() + "".join(f" {e}" for e in extra
                                               if not re.search(rf"(?<![\w-]){e.split()[0]}\b", code))
        out.append(code)
    return "\n".join(out) + "\n"


def pages() -> list[Path]:
    """README.md and every Markdown page of docs/ (not the generated or copied ones)."""
    found = [ROOT / "README.md"]
    for p in sorted(DOCS.rglob("*.md")):
        if not _SKIP_DIRS.intersection(p.relative_to(DOCS).parts):
            found.append(p)
    return found


def page_id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def env() -> dict[str, str]:
    """The environment of the blocks: this checkout first on the path, one thread, no mirror."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CALOPC_IO_THREADS="1")
    e.pop("CALOPC_DATA_URL", None)
    return e


_PRELUDE = f"""set -euo pipefail
calopc() {{ "{sys.executable}" -m calopc "$@"; }}
python() {{ "{sys.executable}" "$@"; }}
"""


def run_page(page: Path, folder: Path) -> list[str]:
    """Run the blocks of ``page`` in ``folder``; returns what was skipped or replaced and why, and CPU seconds."""
    import resource

    notes = []
    environ = env()
    for k, b in enumerate(blocks(page)):
        where = f"{page.relative_to(ROOT)}:{b.line}"
        if b.lang not in ("bash", "python"):
            continue
        if b.mark == "skip":
            notes.append(f"{where}: skipped: {b.reason or 'no reason given'}")
            continue
        if b.lang == "bash":
            script = shell_script(b)
            cmd = ["bash", "-c", _PRELUDE + script]
        else:
            script = b.text
            (folder / f"_block{k}.py").write_text(script)
            cmd = [sys.executable, f"_block{k}.py"]
        notes += [f"{where}: {n}" for n in b.notes]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=folder, env=environ, capture_output=True, text=True, timeout=1800)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        notes.append(f"{where}: {b.lang} block, {cpu:.1f} s CPU")
        if proc.returncode != 0:
            pytest.fail(f"{where}: the {b.lang} block failed (exit {proc.returncode}):\n{script}\n"
                        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return notes
