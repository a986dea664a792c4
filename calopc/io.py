r"""Reading and writing CaloChallenge HDF5 files, with validation and atomic output.

The official format: two datasets, ``incident_energies`` of shape ``(N, 1)`` and
``showers`` of shape ``(N, n_voxels)``, both in MeV, gzip-compressed, no groups.

Also the output safety every writer of calopc shares: :func:`atomic_output` (temporary file
named with the process id, renamed when complete; stale ones of dead processes swept; file-system
errors reported as one :class:`OutputError` naming the target), :func:`check_writable` and
:func:`check_not_input` (run before any work), :func:`deferred_interrupts` /
:func:`check_interrupt` (Ctrl-C and SIGTERM honoured between chunks, which h5py otherwise
swallows), and small helpers: :func:`json_safe` (valid JSON without bare NaN) and
:func:`progress_bar` (bars only on a terminal).
"""

from __future__ import annotations

__all__ = [
    "Interrupted",
    "OutputError",
    "ShowerFile",
    "ShowerFileError",
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
    "progress_bar",
    "sweep_stale_parts",
    "write_showers",
]

import contextlib
import errno as _errno
import fnmatch
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import Geometry, GeometryError, detect_geometry

INCIDENT_KEY = "incident_energies"
SHOWERS_KEY = "showers"


class ShowerFileError(ValueError):
    """An input file is not a valid CaloChallenge shower file."""


class OutputError(ValueError):
    """An output cannot be written (same file as an input, no permission, disk full, ...); one line to report."""


# ----------------------------------------------------------------------------- interrupts
class Interrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` that remembers which signal caused it (SIGINT → exit 130, SIGTERM → 143)."""

    def __init__(self, signum: int = signal.SIGINT, *args: object) -> None:
        super().__init__(*args)
        self.signum = int(signum)


_pending_signals: list[int] = []
_deferring = False


def _deferred_handler(signum: int, frame: object) -> None:
    if _pending_signals:  # a second Ctrl-C: stop now
        raise Interrupted(signum)
    _pending_signals.append(signum)


def check_interrupt() -> None:
    """Raise :class:`Interrupted` if SIGINT/SIGTERM arrived inside :func:`deferred_interrupts` (call between chunks)."""
    if _pending_signals:
        signum = _pending_signals[0]
        _pending_signals.clear()
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM only set a flag; :func:`check_interrupt` raises :class:`Interrupted`.

    h5py ignores a ``KeyboardInterrupt`` raised while it runs its own callbacks (the write then
    completes as if nothing happened), so chunked HDF5 writers defer the interrupt to the next
    chunk boundary. A second signal raises at once. Signals that are ignored (``SIG_IGN``) stay
    ignored. Outside the main thread, or nested, this does nothing.
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(s)
        if h is not signal.SIG_IGN and h is not None:
            old[s] = signal.signal(s, _deferred_handler)
    _deferring = True
    _pending_signals.clear()
    try:
        yield
        check_interrupt()
    finally:
        _deferring = False
        for s, h in old.items():
            signal.signal(s, h)
        pending = list(_pending_signals)
        _pending_signals.clear()
    if pending:  # arrived after the last check (only reached when the block itself succeeded)
        raise Interrupted(pending[0])


# ----------------------------------------------------------------------------- output checks
_WRITE_ERRNOS = {_errno.ENOSPC: "no space left on device", _errno.EDQUOT: "disk quota exceeded",
                 _errno.EROFS: "read-only file system", _errno.EACCES: "permission denied",
                 _errno.EPERM: "operation not permitted", _errno.EFBIG: "file too large",
                 _errno.EISDIR: "is a folder", _errno.ENOTDIR: "a file is where a folder is expected",
                 _errno.EIO: "input/output error"}
_hdf5_failed = False
_hdf5_zombies: list = []  # h5py objects of failed writes: never closed nor freed (freeing them can crash)


def hdf5_write_failed() -> bool:
    """True once an HDF5 write failed in this process.

    After such a failure (typically a full disk) h5py can crash while the interpreter shuts
    down (h5py issue 914), so ``calopc.cli`` leaves with ``os._exit`` once it has reported the error.
    """
    return _hdf5_failed


def _write_reason(err: BaseException) -> str | None:
    """A short reason for a failed write, or None when ``err`` is not a file-system error."""
    code = getattr(err, "errno", None)
    if code is None:  # h5py (and Rust: safetensors) put the errno into the message only
        m = re.search(r"errno = (\d+)|\(os error (\d+)\)", str(err))
        code = int(m.group(1) or m.group(2)) if m else None
    if code in _WRITE_ERRNOS:
        return _WRITE_ERRNOS[code]
    text = str(err).lower()
    for key, reason in (("no space left", "no space left on device"), ("read-only", "read-only file system"),
                        ("permission denied", "permission denied"), ("quota", "disk quota exceeded")):
        if key in text:
            return reason
    return None


def _nearly_full(folder: Path) -> bool:
    """Less than 1 MB free in ``folder`` (a failed write without an errno was then most likely a full disk)."""
    try:
        return shutil.disk_usage(folder).free < 1_000_000
    except OSError:
        return False


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_writable(path: str | os.PathLike, *, expected_bytes: float = 0, folder: bool = False) -> None:
    """Raise :class:`OutputError` (naming ``path``) if it cannot be written; cheap, done before any work.

    Checks: ``path`` is not a folder (or, with ``folder=True``, not a file); no file sits where a
    parent folder must be; the nearest existing parent folder is writable and on a writable file
    system; at least ``expected_bytes`` are free there (a rough estimate of the output size).
    """
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            msg = f"{path}: exists and is not a folder; expected a folder for the output (or a new name)"
            raise OutputError(msg)
    elif path.is_dir():
        msg = f"{path}: is a folder; expected a file name for the output, e.g. {path / 'out'}"
        raise OutputError(msg)
    anc = path if folder else path.parent
    anc = Path(os.path.abspath(anc))
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        msg = f"{path}: cannot write: {anc} is a file, but a folder is expected there"
        raise OutputError(msg)
    if not os.access(anc, os.W_OK | os.X_OK):
        ro = False
        with contextlib.suppress(OSError, AttributeError):
            ro = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
        msg = f"{path}: cannot write in {anc} ({'read-only file system' if ro else 'permission denied'})"
        raise OutputError(msg)
    if expected_bytes > 0:
        try:
            free = shutil.disk_usage(anc).free
        except OSError:
            return
        if free < expected_bytes:
            msg = (f"{path}: not enough free space in {anc}: the output needs about {_fmt_bytes(expected_bytes)}, "
                   f"{_fmt_bytes(free)} are free")
            raise OutputError(msg)


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                    folder: bool = False, names: Iterable[str] = ()) -> None:
    """Raise :class:`OutputError` if writing ``output`` would replace one of ``inputs``.

    Compares resolved paths (symbolic links followed) and, for existing files, inodes (hard links).
    With ``folder=True`` ``output`` is a folder into which files matching the glob patterns
    ``names`` (e.g. ``"*.png"``) are written: an input inside it with such a name is refused too.
    """
    out = Path(output)
    out_r = out.resolve()
    names = tuple(names)
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        inp_r = inp.resolve()
        same = out_r == inp_r
        if not same and out.exists() and inp.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, inp)
        if same:
            msg = f"{out}: the output would overwrite the input {inp}; choose another output name"
            raise OutputError(msg)
        if folder and inp_r.parent == out_r and any(fnmatch.fnmatch(inp_r.name, pat) for pat in names):
            msg = f"{out}: writing into this folder would overwrite the input {inp}; choose another folder"
            raise OutputError(msg)


# ----------------------------------------------------------------------------- atomic output
_PART_RE = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.part$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def sweep_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary ``.NAME.PID@HOST.XXXX.part`` files of dead calopc processes of this host in ``folder``.

    Returns the removed paths. Files of other hosts (shared file systems) and of live processes
    are left alone.
    """
    removed = []
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _PART_RE.match(e.name)
        if not m or m.group("host") != host:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):  # a temporary run directory (calopc distill)
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
    from .locking import sweep_stale_locks

    removed += sweep_stale_locks(folder)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, expected_bytes: float = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Before anything is written, :func:`check_writable` runs (with the rough output size
    ``expected_bytes`` for the free-space check), ``path`` is locked for the block
    (:func:`calopc.locking.output_lock`: a second writer of the same output fails with one line
    naming the holder) and temporary files left by killed runs are removed
    (:func:`sweep_stale_parts`; the temporary name holds the process id and host).
    An interrupted or failed write leaves nothing under the final name and removes the
    temporary file; a file-system error (disk full, read-only, permission) becomes an
    :class:`OutputError` that names ``path``, not the temporary file.
    """
    check_writable(path, expected_bytes=expected_bytes)
    with lock_output(path), _atomic_output(path) as tmp:
        yield tmp


@contextlib.contextmanager
def lock_output(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """:func:`calopc.locking.output_lock` of ``path``; file-system errors as one :class:`OutputError`."""
    from .locking import output_lock

    stack = contextlib.ExitStack()
    try:
        lp = stack.enter_context(output_lock(path, what=what))
    except OSError as err:
        msg = f"{path}: cannot write ({_write_reason(err) or err.strerror or err})"
        raise OutputError(msg) from err
    with stack:
        yield lp


@contextlib.contextmanager
def _atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_parts(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_host()}.", suffix=".part", dir=path.parent)
    except OSError as err:
        msg = f"{path}: cannot write ({_write_reason(err) or err.strerror or err})"
        raise OutputError(msg) from err
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # safetensors (Rust) reports "... (os error 28)" in its own exception type
        if (isinstance(err, (OSError, RuntimeError)) or "(os error " in str(err)) and \
                not isinstance(err, FileNotFoundError):
            reason = _write_reason(err)
            if reason is None and _nearly_full(path.parent):  # torch.save: "file write failed", no errno
                reason = "no space left on device"
            if reason is not None:
                msg = f"{path}: cannot write ({reason}); the incomplete output was removed"
                raise OutputError(msg) from err
        raise


# ----------------------------------------------------------------------------- small shared helpers
def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/±inf replaced by ``None`` and numpy scalars/arrays, tuples and paths made JSON types.

    ``json.dumps(json_safe(x), allow_nan=False)`` then always gives valid JSON (bare ``NaN`` is not JSON).
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def json_dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``: valid JSON, NaN/inf written as ``null``."""
    import json

    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def progress_bar(total: int | None = None, desc: str = "", *, enabled: bool = True, unit: str = "shower", **kw: Any):
    """Progress of long work (:class:`calopc.progress.Progress`): a tqdm bar when stderr is a terminal,
    else a plain log line every ~30 s (never ``\\r`` lines in logs); nothing when not ``enabled``."""
    from .progress import Progress

    return Progress(total, desc, unit=unit, enabled=enabled, **kw)


def native_float_dtype(dtype: np.dtype | type | str) -> np.dtype:
    """The native-byte-order float dtype to compute with: big-endian → native, long double → float64."""
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize > 8:
        return np.dtype(np.float64)
    return dt.newbyteorder("=")

def check_energies(values: np.ndarray, *, where: str, key: str, positive: bool = False) -> None:
    """Raise :class:`ShowerFileError` if ``values`` holds NaN, inf or negative numbers (or zeros, with ``positive``)."""
    bad = ~np.isfinite(values)
    if bad.any():
        idx = np.argwhere(bad)[0]
        msg = f"{where}: dataset {key!r} holds non-finite values (first at index {tuple(int(i) for i in idx)}: {values[tuple(idx)]}); expected finite energies in MeV"
        raise ShowerFileError(msg)
    neg = values < 0
    if neg.any():
        idx = np.argwhere(neg)[0]
        msg = f"{where}: dataset {key!r} holds negative values (first at index {tuple(int(i) for i in idx)}: {values[tuple(idx)]}); expected energies >= 0 MeV"
        raise ShowerFileError(msg)
    if positive:
        zero = values == 0
        if zero.any():
            idx = np.argwhere(zero)[0]
            msg = (f"{where}: dataset {key!r} holds zeros (first at index {tuple(int(i) for i in idx)}); "
                   "expected energies > 0 MeV")
            raise ShowerFileError(msg)


class ShowerFile:
    """An open, validated CaloChallenge HDF5 file; read it whole or in chunks.

    Use as a context manager::

        with open_showers("dataset_2_1.hdf5") as f:
            for e_inc, showers in f.iterate(step_size="256 MB"):
                ...
    """

    def __init__(self, path: str | os.PathLike, *, geometry: Geometry | None = None, validate: bool = True) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            msg = f"{self.path}: no such file"
            raise FileNotFoundError(msg)
        if self.path.is_dir():
            msg = f"{self.path}: is a folder, expected an HDF5 file"
            raise ShowerFileError(msg)
        if not os.access(self.path, os.R_OK):
            msg = f"{self.path}: cannot read (permission denied)"
            raise ShowerFileError(msg)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            if "unable to lock file" in str(err) or getattr(err, "errno", None) == _errno.EAGAIN:
                # another process holds the file open for writing (HDF5 file locking), it is not damaged
                msg = (f"{self.path}: cannot open: another process has it open for writing (HDF5 file lock; "
                       f"{err}); wait until it is written, or read it anyway with HDF5_USE_FILE_LOCKING=FALSE")
            else:
                msg = f"{self.path}: cannot open as HDF5 (truncated or not an HDF5 file?): {err}"
            raise ShowerFileError(msg) from err
        try:
            self._check_layout(geometry)
            self.validate = validate
        except BaseException:
            self._f.close()
            raise

    def _check_layout(self, geometry: Geometry | None) -> None:
        keys = sorted(self._f.keys())
        for key in (INCIDENT_KEY, SHOWERS_KEY):
            if key not in self._f:
                msg = f"{self.path}: dataset {key!r} not found; expected keys {INCIDENT_KEY!r} and {SHOWERS_KEY!r}, found {keys}"
                raise ShowerFileError(msg)
        inc, sh = self._f[INCIDENT_KEY], self._f[SHOWERS_KEY]
        import h5py

        for key, ds in ((INCIDENT_KEY, inc), (SHOWERS_KEY, sh)):
            if not isinstance(ds, h5py.Dataset):
                msg = f"{self.path}: {key!r} is a {type(ds).__name__}, expected a dataset"
                raise ShowerFileError(msg)
            if ds.dtype.kind != "f":
                msg = f"{self.path}: dataset {key!r} has dtype {ds.dtype}, expected floating point (MeV)"
                raise ShowerFileError(msg)
        if inc.ndim != 2 or inc.shape[1] != 1:
            if inc.ndim == 1:
                pass  # tolerated: (N,) incident energies
            else:
                msg = f"{self.path}: dataset {INCIDENT_KEY!r} must have shape (N, 1), got {inc.shape}"
                raise ShowerFileError(msg)
        if sh.ndim != 2:
            msg = f"{self.path}: dataset {SHOWERS_KEY!r} must have shape (N, n_voxels), got {sh.shape}"
            raise ShowerFileError(msg)
        if inc.shape[0] != sh.shape[0]:
            msg = (f"{self.path}: {INCIDENT_KEY!r} has {inc.shape[0]} rows but {SHOWERS_KEY!r} has "
                   f"{sh.shape[0]}; expected the same number of showers")
            raise ShowerFileError(msg)
        n_vox = sh.shape[1]
        if geometry is None:
            try:
                geometry = detect_geometry(n_vox)
            except GeometryError as err:
                msg = f"{self.path}: dataset {SHOWERS_KEY!r} has shape {sh.shape}: {err}"
                raise ShowerFileError(msg) from err
        elif geometry.n_voxels != n_vox:
            msg = (f"{self.path}: dataset {SHOWERS_KEY!r} must have shape (N, {geometry.n_voxels}) for "
                   f"geometry {geometry.name!r}, got {sh.shape}")
            raise ShowerFileError(msg)
        self.geometry = geometry
        self._inc, self._sh = inc, sh
        from ._h5direct import chunk_plan

        self._plan = chunk_plan(self._f, sh)  # None: h5py reads (other filters, contiguous, ...)
        self.threads: int | None = None  # inflating threads of the direct reader (None: the usable CPUs)

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return int(self._sh.shape[0])

    @property
    def dtype(self) -> np.dtype:
        """The dtype :meth:`read` returns for the showers: the stored one, native byte order (long double → float64)."""
        return native_float_dtype(self._sh.dtype)

    @property
    def incident_dtype(self) -> np.dtype:
        """The dtype :meth:`read` returns for the incident energies (see :attr:`dtype`)."""
        return native_float_dtype(self._inc.dtype)

    @property
    def n_voxels(self) -> int:
        return int(self._sh.shape[1])

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    # ------------------------------------------------------------------ reading
    def read(self, start: int | None = None, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Incident energies ``(n,)`` and showers ``(n, n_voxels)`` of rows ``start:stop``."""
        n = len(self)
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        try:
            inc = np.asarray(self._inc[start:stop]).reshape(-1)
            if self._plan is not None:
                sh = np.empty((stop - start, self.n_voxels), dtype=self.dtype)

                def put(r0: int, r1: int, band: np.ndarray) -> None:
                    sh[r0 - start:r1 - start] = band  # in the worker thread; casts big-endian to native

                for _ in self._plan.map_bands(put, start, stop, threads=self.threads):
                    pass
            else:
                sh = np.asarray(self._sh[start:stop])
        except (OSError, RuntimeError, ValueError, zlib.error) as err:
            msg = f"{self.path}: failed to read rows {start}:{stop} (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from err
        # big-endian or long-double files: compute in native float (awkward and torch need it)
        inc = inc.astype(self.incident_dtype, copy=False)
        sh = sh.astype(self.dtype, copy=False)
        if self.validate:
            check_energies(inc, where=f"{self.path} rows {start}:{stop}", key=INCIDENT_KEY, positive=True)
            check_energies(sh, where=f"{self.path} rows {start}:{stop}", key=SHOWERS_KEY)
        return inc, sh

    def rows_per_step(self, step_size: int | str) -> int:
        """Rows per chunk for ``step_size`` given as a row count or a size string (``"256 MB"``)."""
        if isinstance(step_size, int):
            return max(1, step_size)
        nbytes = parse_size(step_size)
        row = max(1, self.n_voxels * self.dtype.itemsize)
        return max(1, nbytes // row)

    def iterate(self, step_size: int | str = "256 MB", *, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(incident (n,), showers (n, n_voxels))`` chunks; at most ``step_size`` of dense data each."""
        stop = len(self) if stop is None else min(stop, len(self))
        step = self.rows_per_step(step_size)
        for i in range(start, stop, step):
            yield self.read(i, min(i + step, stop))


    def iterate_sparse(self, step_size: int | str = "256 MB", *, threshold: float = 0.0, start: int = 0,
                       stop: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(first row, incident (n,), counts (n,), cell int32 (P,), E (P,))`` per chunk of about ``step_size``.

        The non-empty cells of each shower in increasing cell order: energies ``> 0`` (with a
        ``threshold`` > 0: ``>= threshold``), in the file's float dtype (native byte order).
        Gzip files are inflated, scanned and validated in worker threads (:attr:`threads`);
        validation sees every non-zero value (NaN, inf and negative energies are errors) and
        the incident energies. Memory: the sparse data of one step plus a few HDF5 chunks.
        """
        stop = len(self) if stop is None else min(stop, len(self))
        step = self.rows_per_step(step_size)
        n_vox = self.n_voxels
        dtype = self.dtype

        def sparse(r0: int, r1: int, band: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            a = band if band.dtype == dtype else band.astype(dtype)
            flat = a.reshape(-1)
            idx = np.flatnonzero(flat != 0)  # (a bool mask first: 3x faster); NaN is non-zero too: validated below
            e = flat[idx]
            if self.validate:
                bad = ~np.isfinite(e) | (e < 0)
                if bad.any():
                    j = int(idx[np.flatnonzero(bad)[0]])
                    row, col = r0 + j // n_vox, j % n_vox
                    what = "negative" if np.isfinite(e[bad][0]) else "non-finite"
                    want = "energies >= 0 MeV" if what == "negative" else "finite energies in MeV"
                    msg = (f"{self.path} rows {r0}:{r1}: dataset {SHOWERS_KEY!r} holds {what} values (first at "
                           f"index ({row}, {col}): {flat[j]}); expected {want}")
                    raise ShowerFileError(msg)
            if threshold > 0:
                keep = e >= threshold
                idx, e = idx[keep], e[keep]
            bounds = np.searchsorted(idx, np.arange(r1 - r0 + 1, dtype=np.int64) * n_vox)
            counts = np.diff(bounds)
            cell = (idx - np.repeat(np.arange(r1 - r0, dtype=np.int64) * n_vox, counts)).astype(np.int32)
            return counts, cell, e

        def bands() -> Iterator[tuple[int, int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
            if self._plan is not None:  # one pipeline over the whole range: the threads never wait for a step
                yield from self._plan.map_bands(sparse, start, stop, threads=self.threads)
                return
            for i in range(start, stop, step):
                j = min(i + step, stop)
                yield i, j, sparse(i, j, np.asarray(self._sh[i:j]))

        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        first = last = start
        it = bands()
        while True:
            try:
                item = next(it, None)
            except ShowerFileError:
                raise
            except (OSError, RuntimeError, ValueError, zlib.error) as err:
                msg = f"{self.path}: failed to read rows {first}:{min(first + step, stop)} (corrupt or truncated file?): {err}"
                raise ShowerFileError(msg) from err
            if item is not None:
                parts.append(item[2])
                last = item[1]
                if last - first < step:
                    continue
            if not parts:
                break
            counts, cell, e = parts[0] if len(parts) == 1 else (np.concatenate(x) for x in zip(*parts))
            parts = []
            while last - first >= step or (item is None and last > first):  # chunks of exactly step rows
                k = min(step, last - first)
                p = int(counts[:k].sum())
                yield first, self._read_incident(first, first + k), counts[:k], cell[:p], e[:p]
                counts, cell, e = counts[k:], cell[p:], e[p:]
                first += k
            if last > first:
                parts = [(counts, cell, e)]
            if item is None:
                break

    def _read_incident(self, start: int, stop: int) -> np.ndarray:
        try:
            inc = np.asarray(self._inc[start:stop]).reshape(-1).astype(self.incident_dtype, copy=False)
        except (OSError, RuntimeError, ValueError) as err:
            msg = f"{self.path}: failed to read rows {start}:{stop} (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from err
        if self.validate:
            check_energies(inc, where=f"{self.path} rows {start}:{stop}", key=INCIDENT_KEY, positive=True)
        return inc


def open_showers(path: str | os.PathLike, *, geometry: Geometry | None = None, validate: bool = True) -> ShowerFile:
    """Open and validate a CaloChallenge HDF5 file (see :class:`ShowerFile`)."""
    return ShowerFile(path, geometry=geometry, validate=validate)


def parse_size(s: str | int) -> int:
    """``"256 MB"`` → bytes (1 MB = 10⁶ B; KiB/MiB/GiB are binary)."""
    if isinstance(s, int):
        return s
    t = s.strip().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    for u, f in units.items():
        if t.lower().endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, f = t, 1
    try:
        return int(float(num) * f)
    except ValueError:
        msg = f"cannot parse size {s!r}; expected e.g. '256 MB' or a number of bytes"
        raise ValueError(msg) from None


class ShowerWriter:
    """Append showers chunk by chunk to a new file in the official format (used by :func:`write_showers`)."""

    def __init__(self, path: Path, n_voxels: int, *, dtype: np.dtype | type = np.float64, compression: str | None = "gzip",
                 attrs: dict | None = None, incident_dtype: np.dtype | type | None = None,
                 target: Path | None = None, threads: int | None = None) -> None:
        import h5py

        self.target = Path(target) if target is not None else Path(path)
        self._f = None
        self._failed_here = False
        try:
            self._f = h5py.File(path, "w")
            chunk_rows = max(1, min(1000, (1 << 20) // max(1, n_voxels)))
            kw = {"compression": compression} if compression else {}
            self._inc = self._f.create_dataset(INCIDENT_KEY, shape=(0, 1), maxshape=(None, 1),
                                               dtype=dtype if incident_dtype is None else incident_dtype,
                                               chunks=(max(chunk_rows, 1024), 1), **kw)
            self._sh = self._f.create_dataset(SHOWERS_KEY, shape=(0, n_voxels), maxshape=(None, n_voxels), dtype=dtype,
                                              chunks=(chunk_rows, n_voxels), **kw)
            for k, v in (attrs or {}).items():
                self._f.attrs[k] = v
            self._direct = None
            from ._h5direct import enabled

            if compression == "gzip" and enabled():  # chunks deflated in worker threads, stored directly (calopc._h5direct)
                from ._h5direct import DeflateWriter

                self._direct = DeflateWriter(self._sh, threads=threads)
        except BaseException:
            self._failed()
            self.abort()
            raise
        self.n = 0

    def _failed(self) -> None:
        global _hdf5_failed
        _hdf5_failed = True
        self._failed_here = True

    def append(self, incident: np.ndarray, showers: np.ndarray) -> None:
        """Append ``(n,)`` incident energies (MeV, > 0) and ``(n, n_voxels)`` showers; checks for Ctrl-C first."""
        check_interrupt()
        incident = np.asarray(incident).reshape(-1, 1)
        n = incident.shape[0]
        if showers.shape[0] != n:
            msg = f"append: {n} incident energies but {showers.shape[0]} showers"
            raise ValueError(msg)
        if n:
            try:
                check_energies(incident[:, 0], where=f"{self.target}: refusing to write showers {self.n}:{self.n + n}",
                               key=INCIDENT_KEY, positive=True)
            except ShowerFileError as err:
                raise OutputError(str(err)) from None
        try:
            self._inc.resize(self.n + n, axis=0)
            self._inc[self.n:] = incident
            if self._direct is not None:
                self._direct.append(showers)
            else:
                self._sh.resize(self.n + n, axis=0)
                self._sh[self.n:] = showers
        except BaseException:
            self._failed()
            raise
        self.n += n
        check_interrupt()

    def set_attrs(self, attrs: dict) -> None:
        """Set root attributes of the file (e.g. statistics known only at the end); before :meth:`close`."""
        for k, v in attrs.items():
            self._f.attrs[k] = v

    def close(self) -> None:
        if self._f is None:
            return
        try:
            if self._direct is not None:
                self._direct.close()
                self._direct = None
            self._f.close()
        except BaseException:
            self._failed()
            self.abort()
            raise
        self._f = None

    def abort(self) -> None:
        """Let go of the file after a failure (it is about to be removed).

        After a failed HDF5 write (disk full) closing or even freeing the h5py objects can crash
        the process (h5py issue 914), so they are parked, never closed; ``calopc.cli`` then leaves
        with ``os._exit``. After other failures the file is closed normally.
        """
        direct = getattr(self, "_direct", None)
        if direct is not None:
            with contextlib.suppress(Exception):
                direct.abort()
            self._direct = None
        if self._f is None:
            return
        if self._failed_here:
            _hdf5_zombies.append((self._f, getattr(self, "_inc", None), getattr(self, "_sh", None)))
        else:
            with contextlib.suppress(Exception):
                self._f.close()
        self._f = self._inc = self._sh = None


@contextlib.contextmanager
def shower_writer(path: str | os.PathLike, n_voxels: int, *, expected_bytes: float = 0, **kw: object
                  ) -> Iterator[ShowerWriter]:
    """Atomically write a shower file chunk by chunk: ``with shower_writer(p, 6480) as w: w.append(e, s)``.

    Ctrl-C and SIGTERM are deferred to the next :meth:`ShowerWriter.append` (h5py would swallow
    them); the temporary file is removed and :class:`Interrupted` raised. ``expected_bytes``: rough
    output size for the free-space check.
    """
    with deferred_interrupts(), atomic_output(path, expected_bytes=expected_bytes) as tmp:
        w = ShowerWriter(tmp, n_voxels, target=Path(path), **kw)
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        w.close()
        check_interrupt()  # a signal during the last chunk: remove the file rather than keep it


def write_showers(path: str | os.PathLike, incident: np.ndarray, showers: np.ndarray, *,
                  compression: str | None = "gzip", attrs: dict | None = None) -> None:
    """Write one file in the official format, atomically (temporary file + rename)."""
    showers = np.asarray(showers)
    incident = np.asarray(incident).reshape(-1, 1)
    if showers.ndim != 2 or showers.shape[0] != incident.shape[0]:
        msg = f"write_showers: expected showers (N, n_voxels) and incident (N, 1), got {showers.shape} and {incident.shape}"
        raise ValueError(msg)
    dtype = np.result_type(showers.dtype, np.float32)
    inc_dtype = np.result_type(incident.dtype, np.float32)
    with shower_writer(path, showers.shape[1], dtype=dtype, incident_dtype=inc_dtype, compression=compression,
                       attrs=attrs, expected_bytes=0.1 * showers.nbytes) as w:
        w.append(incident, showers)
