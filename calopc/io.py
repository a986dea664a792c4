r"""The names of :mod:`calopc.hdf5` (shower files) and :mod:`calopc._safety` (output safety), in one place.

Older code imports them from here; new code imports from the module that defines them.
"""

from __future__ import annotations

__all__ = [
    "INCIDENT_KEY",
    "SHOWERS_KEY",
    "Interrupted",
    "OutputError",
    "ShowerFile",
    "ShowerFileError",
    "ShowerWriter",
    "atomic_output",
    "check_energies",
    "check_interrupt",
    "check_not_input",
    "check_writable",
    "deferred_interrupts",
    "hdf5_write_failed",
    "json_dumps",
    "json_safe",
    "lock_output",
    "native_float_dtype",
    "open_showers",
    "parse_size",
    "progress_bar",
    "shower_writer",
    "sweep_stale_parts",
    "write_showers",
]

from ._safety import (
    Interrupted,
    OutputError,
    atomic_output,
    check_interrupt,
    check_not_input,
    check_writable,
    deferred_interrupts,
    json_dumps,
    json_safe,
    lock_output,
    sweep_stale_parts,
)
from .hdf5 import (
    INCIDENT_KEY,
    SHOWERS_KEY,
    ShowerFile,
    ShowerFileError,
    ShowerWriter,
    check_energies,
    hdf5_write_failed,
    native_float_dtype,
    open_showers,
    parse_size,
    shower_writer,
    write_showers,
)
from .locking import _host, _pid_alive  # noqa: F401  (the one definition; kept importable from here)
from .progress import progress_bar
