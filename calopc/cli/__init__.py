r"""The ``calopc`` command line: a thin argparse layer over the library.

Layout:

* :mod:`calopc.cli.options`: the option types and conventions every command shares
  (``positive_int``, ``threshold_arg``, ``add_output``, :data:`COLLISIONS`, :class:`CLIError`, ...);
  it sits below every command-line module;
* :mod:`calopc.cli.data`: ``synth``, ``convert`` (with :mod:`calopc.cli.interop`: ``--to``/``--from
  showerdata``), ``voxelize``, ``info``, ``demo``; :mod:`calopc.cli.download`: ``download``;
  :mod:`calopc.cli.display`: ``show``; :mod:`calopc.cli.eval`: ``evaluate``, ``compare``;
  :mod:`calopc.cli.models`: ``train``, ``generate``, ``distill``; :mod:`calopc.cli.export`: ``export``.
  Each defines ``register(subparsers)``; the handler is stored as ``func`` and returns an exit code;
* this root: :data:`COMMANDS` (a static table of command names, their module and one-line help)
  and :func:`main`. It imports a command's module only when that command is run, so
  ``calopc --help`` imports none of them (nor numpy).

:func:`main` reports every user error as one line (exit 2), Ctrl-C as exit 130 and SIGTERM as
exit 143 (the temporary output removed), and exits quietly when its output pipe is closed.
"""

from __future__ import annotations

__all__ = [
    "COLLISIONS",
    "COMMANDS",
    "CLIError",
    "add_output",
    "add_progress",
    "build_parser",
    "fraction",
    "main",
    "nonneg_float",
    "nonneg_int",
    "positive_float",
    "positive_int",
    "threshold_arg",
]

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

from .options import (
    COLLISIONS,
    FORMATTER,
    CLIError,
    add_output,
    add_progress,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    threshold_arg,
)

#: command -> (module defining ``register(subparsers)``, one-line help for ``calopc --help``).
#: A test keeps the help texts equal to the ones the modules register.
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("calopc.cli.download", "download the CaloChallenge datasets from Zenodo, verified against their "
                                        "md5 sums"),
    "synth": ("calopc.cli.data", "write a synthetic shower file in the official CaloChallenge format"),
    "convert": ("calopc.cli.data", "CaloChallenge HDF5 -> point-cloud Parquet (streams in chunks)"),
    "voxelize": ("calopc.cli.data", "point-cloud Parquet -> CaloChallenge HDF5"),
    "info": ("calopc.cli.data", "dataset, number of showers and hits/shower of an HDF5 or Parquet file"),
    "show": ("calopc.cli.display", "draw showers in 3-D: an interactive HTML page (offline), files side by side"),
    "demo": ("calopc.cli.data", "the embedded default job: synthetic showers -> points -> voxels, with a summary"),
    "evaluate": ("calopc.cli.eval",
                 "compare a generated sample with a reference: CaloChallenge metrics, plots, report"),
    "compare": ("calopc.cli.eval", "compare several generated samples with one reference: multi-class "
                                   "log-posterior and a leaderboard"),
    "train": ("calopc.cli.models", "train a generative model on point-cloud Parquet showers"),
    "generate": ("calopc.cli.models", "generate showers from a trained run directory"),
    "distill": ("calopc.cli.models", "distil a caloclouds run into a one-step consistency model"),
    "export": ("calopc.cli.export", "export a trained run as an ONNX graph (Geant4 Par04 or padded points)"),
}

_EPILOG = """\
workflow:
  calopc synth showers.hdf5 -n 2000 --geometry 2         # or a CaloChallenge file
  calopc convert showers.hdf5 -o train.parquet           # voxels -> point clouds
  calopc train calopointflow --data train.parquet -o run/
  calopc generate run/ --energies showers.hdf5 -o gen.hdf5
  calopc evaluate gen.hdf5 showers.hdf5 -o report/
  calopc show showers.hdf5 gen.hdf5 --index 0 1 2        # 3-D displays, side by side (showers.html)
  calopc voxelize gen.parquet -o gen.hdf5                # point clouds -> voxels
  calopc export run/ -o model.onnx                       # the run as an ONNX graph for Geant4 (Par04)

'calopc COMMAND --help' shows each command's options and an example.
"""

_ALL = "*"


def _register(sub: argparse._SubParsersAction, modname: str) -> None:
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.startswith("calopc") and modname.startswith(err.name):
            return  # a part of calopc that this installation leaves out
        raise
    mod.register(sub)


def build_parser(command: str | None = _ALL) -> argparse.ArgumentParser:
    """The ``calopc`` parser.

    Args:
        command: register only the module of this command (the others get a stub with their
            one-line help, enough for ``calopc --help``); ``None``: stubs only; default: every
            command in full (for tests and documentation).
    """
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="calopc", description="Calorimeter showers as point clouds.",
                                     epilog=_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("--version", action="version", version=f"calopc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command == _ALL:
        modules = list(dict.fromkeys(m for m, _ in COMMANDS.values()))
    elif command in COMMANDS:
        modules = [COMMANDS[command][0]]
    else:
        modules = []
    for modname in modules:
        _register(sub, modname)
    stubs = [name for name in COMMANDS if name not in sub.choices]
    for name in stubs:
        sub.add_parser(name, help=COMMANDS[name][1])
    # 'calopc --help' lists the commands in the table's order
    order = {name: i for i, name in enumerate(COMMANDS)}
    sub._choices_actions.sort(key=lambda a: order.get(a.dest, len(order)))  # noqa: SLF001
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first argument that is not an option), if it is one of :data:`COMMANDS`."""
    for a in argv:
        if a == "--":
            continue
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


# ----------------------------------------------------------------------------- main
def _raise_sigterm(signum: int, frame: object) -> None:
    from .._safety import Interrupted

    raise Interrupted(signum)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (Slurm, ``timeout``, ``kill``) raises :class:`~calopc._safety.Interrupted` like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _one_line_warnings(cmd: str) -> Iterator[None]:
    """Warnings are printed as ``calopc CMD: warning: ...`` (no source lines, no file paths of the library)."""
    with warnings.catch_warnings():
        def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
            with contextlib.suppress(Exception):
                print(f"calopc {cmd}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``calopc info F | head -1``): leave quietly, like other Unix tools."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
    return 128 + signal.SIGPIPE


def _describe(err: BaseException) -> str:
    from .._safety import OutputError

    if isinstance(err, OSError) and not isinstance(err, OutputError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``calopc`` command line; returns the exit code.

    Exit codes: 0 success; 2 a user error, reported as one line (bad input, bad option, output not
    writable, disk full); 130 Ctrl-C and 143 SIGTERM (the incomplete output removed); 141 stdout
    closed early. ``CALOPC_DEBUG=1`` shows the traceback of unexpected errors.
    """
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(args_list))
    args = parser.parse_args(args_list)
    cmd = args.command
    from ..geometry import GeometryError
    from ..hdf5 import ShowerFileError

    code: int
    with _sigterm_as_interrupt(), _one_line_warnings(cmd):
        try:
            code = int(args.func(args) or 0)
            sys.stdout.flush()
        except BrokenPipeError:
            code = _quiet_broken_pipe()
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", signal.SIGINT)
            name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
            detail = str(err) or "no output was written"
            print(f"calopc {cmd}: interrupted ({name}); {detail}", file=sys.stderr)
            code = 128 + int(signum)
        except (ShowerFileError, GeometryError, FileNotFoundError, CLIError, ValueError, OSError) as err:
            print(f"calopc {cmd}: error: {_describe(err)}", file=sys.stderr)
            code = 2
        except Exception as err:
            user = _user_error(err)
            if user is not None:
                print(f"calopc {cmd}: error: {user}", file=sys.stderr)
                return _exit(argv, 2)
            if os.environ.get("CALOPC_DEBUG"):
                raise
            print(f"calopc {cmd}: internal error: {type(err).__name__}: {err} (CALOPC_DEBUG=1 shows the traceback; "
                  "please report it)", file=sys.stderr)
            code = 1
    return _exit(argv, code)


def _exit(argv: Sequence[str] | None, code: int) -> int:
    from ..hdf5 import hdf5_write_failed

    if argv is None and hdf5_write_failed():
        # h5py can crash while the interpreter shuts down after a failed write (h5py issue 914):
        # the error is reported and the temporary file removed, so leave without that teardown
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


def _user_error(err: BaseException) -> str | None:
    """The one-line message of a user error that arrives as a generic exception, else None."""
    import re

    m = re.match(r"Symlink loop from (.+)$", str(err)) if isinstance(err, RuntimeError) else None
    if m:  # pathlib's resolve() on a loop of symbolic links (ELOOP from the OS is an OSError, handled above)
        return f"{m.group(1).strip(chr(39))}: a loop of symbolic links; expected a file or folder"
    return None
