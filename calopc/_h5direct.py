r"""Gzip HDF5 datasets read and written chunk by chunk, with zlib running in a thread pool.

h5py inflates (and deflates) gzip chunks on one thread while holding its global lock. The
official CaloChallenge files are plain gzip-compressed 2-d datasets, so calopc asks h5py for the
raw, still compressed chunk bytes (``read_direct_chunk``: HDF5 finds them, whatever the file
driver or userblock) and inflates them in worker threads (libdeflate when the ``deflate``
package is installed, else :mod:`zlib`; both release the GIL). The raw reads are about 1 % of
the work and run under h5py's lock; the inflating runs in parallel. Writing compresses whole
chunks in worker threads and stores them with ``write_direct_chunk``. The files stay ordinary
gzip HDF5 that any HDF5 reader opens.

Anything else (other filters such as shuffle or lzf, checksums, contiguous storage, more than
two dimensions) is left to h5py: :func:`chunk_plan` returns ``None`` and the caller reads the
ordinary way.

Memory: a reader keeps at most ``2 * threads + 2`` row bands in flight, fewer when the bands are
large (:data:`INFLIGHT_BYTES`); the default thread count is capped at :data:`MAX_DEFAULT_THREADS`.
"""

from __future__ import annotations

__all__ = ["INFLIGHT_BYTES", "MAX_DEFAULT_THREADS", "DeflateWriter", "RowChunks", "chunk_plan", "codec",
           "default_threads", "enabled"]

import collections
import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

_H5Z_FILTER_DEFLATE = 1

#: Default worker threads at most (``CALOPC_IO_THREADS`` may set more): inflating saturates the memory
#: bandwidth long before 8 cores, and every thread adds a band or two of memory.
MAX_DEFAULT_THREADS = 8

#: Dense bytes of row bands a reader keeps in flight (submitted, not yet consumed) when the bands are large;
#: never fewer than ``threads + 1`` bands, so that every thread has work.
INFLIGHT_BYTES = 64 << 20


class _Codec:
    """Whole-buffer zlib streams: libdeflate (package ``deflate``) when installed, else the standard zlib.

    Both release the GIL. libdeflate inflates several times faster than zlib and deflates at the
    same level about twice as fast, into an equally valid zlib stream (HDF5's gzip filter reads
    it). ``CALOPC_DEFLATE=zlib`` forces the standard module.
    """

    def __init__(self) -> None:
        self.name = "zlib"
        self._lib = None
        if os.environ.get("CALOPC_DEFLATE", "").strip().lower() != "zlib":
            try:
                import deflate

                self._lib = deflate
                self.name = "libdeflate"
            except ImportError:
                pass

    def decompress(self, data: bytes, size: int) -> bytes:
        if self._lib is not None:
            try:
                return self._lib.zlib_decompress(data, size)
            except self._lib.DeflateError as err:  # a wrong size or corrupt data
                msg = f"inflating failed ({err})"
                raise OSError(msg) from None
        return zlib.decompress(data)

    def compress(self, data: memoryview, level: int) -> bytes:
        if self._lib is not None:
            return self._lib.zlib_compress(data, level)
        return zlib.compress(data, level)


_codec: _Codec | None = None


def codec() -> _Codec:
    """The zlib implementation in use (chosen once per process)."""
    global _codec
    if _codec is None:
        _codec = _Codec()
    return _codec


def enabled() -> bool:
    """False when ``CALOPC_DIRECT_IO=0``: h5py reads and writes every chunk itself (the slower, older path)."""
    return os.environ.get("CALOPC_DIRECT_IO", "1").strip().lower() not in ("0", "no", "false", "off")


def default_threads() -> int:
    """Worker threads for inflating/deflating: the CPUs this process may use, at most :data:`MAX_DEFAULT_THREADS`.

    ``CALOPC_IO_THREADS`` overrides it (any number >= 1).
    """
    env = os.environ.get("CALOPC_IO_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_THREADS))


def _deflate_level(ds: Any) -> int | None:
    """The gzip level when deflate is the dataset's only filter, else None."""
    try:
        dcpl = ds.id.get_create_plist()
        nf = dcpl.get_nfilters()
    except Exception:
        return None
    if nf != 1:
        return None
    code, _flags, values, _name = dcpl.get_filter(0)
    if code != _H5Z_FILTER_DEFLATE:
        return None
    return int(values[0]) if len(values) else 4


class RowChunks:
    """The chunk index of a gzip 2-d dataset: row bands and, per band, the chunks across the columns.

    Built by :func:`chunk_plan`. :meth:`map_bands` inflates the bands of rows ``start:stop`` in a
    thread pool and applies a function to each dense band there too, yielding results in order.
    """

    def __init__(self, ds: Any) -> None:
        self.path = str(ds.file.filename)
        self._dsid = ds.id
        self.shape = tuple(int(s) for s in ds.shape)
        self.chunks = tuple(int(c) for c in ds.chunks)
        self.dtype = np.dtype(ds.dtype)
        fill = ds.fillvalue
        self.fill = 0 if fill is None else fill
        self._index: dict[tuple[int, int], int] = {}  # (row0, col0) of every stored chunk -> its size in bytes

        def visit(info: Any) -> None:
            self._index[(int(info.chunk_offset[0]), int(info.chunk_offset[1]))] = int(info.size)

        if hasattr(ds.id, "chunk_iter"):
            ds.id.chunk_iter(visit)
        else:  # older HDF5: one query per chunk
            for i in range(ds.id.get_num_chunks()):
                visit(ds.id.get_chunk_info(i))

    @property
    def band_rows(self) -> int:
        return self.chunks[0]

    @property
    def band_bytes(self) -> int:
        """Dense bytes of one band of rows (all its chunks, inflated)."""
        return self.chunks[0] * self.shape[1] * self.dtype.itemsize

    def _chunk(self, row0: int, col0: int) -> np.ndarray:
        """One chunk, inflated: ``(chunk rows, chunk cols)`` in the file's dtype (unwritten chunks: fill value)."""
        rc, cc = self.chunks
        size = self._index.get((row0, col0))
        if size is None:
            return np.full((rc, cc), self.fill, dtype=self.dtype)
        mask, raw = self._dsid.read_direct_chunk((row0, col0))  # under h5py's lock; the inflating is not
        if len(raw) != size:
            msg = f"{self.path}: chunk at rows {row0}.. is truncated (file shorter than its index says)"
            raise OSError(msg)
        expected = rc * cc * self.dtype.itemsize
        try:  # filter mask bit 0: stored without deflate
            data = raw if mask & 1 else codec().decompress(raw, expected)
        except (zlib.error, OSError) as err:
            msg = f"{self.path}: chunk at rows {row0}..: {err}"
            raise OSError(msg) from None
        if len(data) != expected:
            msg = f"{self.path}: chunk at rows {row0}.. inflates to {len(data)} bytes, expected {expected}"
            raise OSError(msg)
        return np.frombuffer(data, dtype=self.dtype).reshape(rc, cc)

    def _band(self, row0: int, r_lo: int, r_hi: int) -> np.ndarray:
        """Rows ``r_lo:r_hi`` (inside the band starting at ``row0``) as a ``(rows, n_cols)`` array."""
        rc, cc = self.chunks
        n_cols = self.shape[1]
        if cc >= n_cols:
            return self._chunk(row0, 0)[r_lo - row0:r_hi - row0, :n_cols]
        out = np.empty((r_hi - r_lo, n_cols), dtype=self.dtype)
        for c0 in range(0, n_cols, cc):
            c1 = min(c0 + cc, n_cols)
            out[:, c0:c1] = self._chunk(row0, c0)[r_lo - row0:r_hi - row0, :c1 - c0]
        return out

    def map_bands(self, fn: Callable[[int, int, np.ndarray], Any], start: int, stop: int, *,
                  threads: int | None = None, lookahead: int | None = None) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(r0, r1, fn(r0, r1, band))`` for the chunk bands covering rows ``start:stop``, in order.

        ``fn`` runs in the worker threads on the dense band (read-only, file dtype). At most
        ``lookahead`` bands are in flight (submitted and not yet consumed), which bounds memory:
        by default 2 per thread + 2, but no more than :data:`INFLIGHT_BYTES` of dense bands
        allow, and never fewer than ``threads + 1``. Memory is then at most ``threads`` bands being
        inflated and scanned plus ``lookahead`` results, whatever the number of rows.
        """
        threads = default_threads() if threads is None else max(1, int(threads))
        if lookahead is None:
            lookahead = min(2 * threads + 2, max(threads + 1, INFLIGHT_BYTES // max(1, self.band_bytes)))
        lookahead = max(1, int(lookahead))
        rc = self.band_rows
        bands = []
        r = start
        while r < stop:
            row0 = (r // rc) * rc
            r1 = min(row0 + rc, stop)
            bands.append((row0, r, r1))
            r = r1
        def task(row0: int, r0: int, r1: int) -> Any:
            return fn(r0, r1, self._band(row0, r0, r1))

        pending: collections.deque[tuple[int, int, Future]] = collections.deque()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="calopc-inflate") as pool:
            try:
                it = iter(bands)
                for row0, r0, r1 in it:
                    pending.append((r0, r1, pool.submit(task, row0, r0, r1)))
                    if len(pending) >= lookahead:
                        break
                while pending:
                    r0, r1, fut = pending.popleft()
                    res = fut.result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append((nxt[1], nxt[2], pool.submit(task, *nxt)))
                    yield r0, r1, res
            finally:
                for _, _, fut in pending:
                    fut.cancel()


def chunk_plan(ds: Any) -> RowChunks | None:
    """A :class:`RowChunks` for the h5py dataset ``ds``, or None when h5py must read it.

    Direct reading needs a 2-d chunked dataset whose only filter is deflate (gzip) and a float
    dtype; any file driver and userblock will do (h5py locates the raw chunks).
    """
    if not enabled():
        return None
    try:
        if ds.ndim != 2 or ds.chunks is None or ds.dtype.kind != "f" or ds.dtype.itemsize > 8:
            return None
        if _deflate_level(ds) is None or ds.external:
            return None
        return RowChunks(ds)
    except Exception:  # anything unexpected in the chunk index: let h5py read it
        return None


class DeflateWriter:
    """Append rows to a resizable 2-d gzip dataset whose chunks span whole rows, deflating in threads.

    Rows are buffered until a chunk is full; full chunks are compressed in a thread pool
    (``zlib.compress`` at the dataset's gzip level) and stored in order with
    ``write_direct_chunk``. Back-pressure: at most ``2 * threads + 1`` chunks wait to be stored, so
    memory is a few chunks per thread, whatever the number of rows. :meth:`flush` writes the last, partial chunk (padded, as HDF5 stores
    edge chunks whole) and must be called before the file is closed. The result is the same
    gzip HDF5 h5py would write.
    """

    def __init__(self, ds: Any, *, threads: int | None = None) -> None:
        self.ds = ds
        self.level = _deflate_level(ds)
        if self.level is None or ds.ndim != 2 or ds.chunks is None or ds.chunks[1] != ds.shape[1]:
            msg = "DeflateWriter needs a 2-d gzip dataset whose chunks span whole rows"
            raise ValueError(msg)
        self.rows = int(ds.chunks[0])
        self.cols = int(ds.shape[1])
        self.dtype = np.dtype(ds.dtype)
        self.n = int(ds.shape[0])  # rows stored so far
        if self.n % self.rows:
            msg = "DeflateWriter must start at a chunk boundary"
            raise ValueError(msg)
        self.threads = default_threads() if threads is None else max(1, int(threads))
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="calopc-deflate")
        self._pending: collections.deque[tuple[int, Future]] = collections.deque()
        self._buf = np.zeros((self.rows, self.cols), dtype=self.dtype)
        self._n_buf = 0
        self._written = self.n  # rows whose chunks are stored

    def _compress(self, block: np.ndarray) -> bytes:
        return codec().compress(np.ascontiguousarray(block).data, self.level)

    def _submit(self, row0: int, block: np.ndarray) -> None:
        self._pending.append((row0, self._pool.submit(self._compress, block)))
        while len(self._pending) > 2 * self.threads + 1:
            self._store_one()

    def _store_one(self) -> None:
        row0, fut = self._pending.popleft()
        data = fut.result()
        self.ds.id.write_direct_chunk((row0, 0), data, 0)

    def append(self, rows: np.ndarray) -> None:
        """Append ``(n, cols)`` rows (cast to the dataset's dtype)."""
        rows = np.asarray(rows)
        n = rows.shape[0]
        if n == 0:
            return
        new_total = self.n + self._n_buf + n
        if self.ds.shape[0] < new_total:
            self.ds.resize(new_total, axis=0)
        i = 0
        if self._n_buf:  # fill the partial chunk first
            k = min(self.rows - self._n_buf, n)
            self._buf[self._n_buf:self._n_buf + k] = rows[:k]
            self._n_buf += k
            i = k
            if self._n_buf == self.rows:
                self._submit(self.n, self._buf)
                self._buf = np.zeros((self.rows, self.cols), dtype=self.dtype)
                self.n += self.rows
                self._n_buf = 0
        while n - i >= self.rows:  # whole chunks straight from the input (a copy: the caller may reuse it)
            block = np.array(rows[i:i + self.rows], dtype=self.dtype, order="C")
            self._submit(self.n, block)
            self.n += self.rows
            i += self.rows
        if i < n:
            k = n - i
            self._buf[:k] = rows[i:]
            self._n_buf = k

    def flush(self) -> None:
        """Store every chunk, the last partial one included.

        A partial chunk stored here is stored again when later rows fill it; HDF5 does not reclaim the
        first copy's space, so each flush in the middle of a stream leaves up to one chunk of unused
        bytes in the file (:meth:`close` flushes once, at the end).
        """
        if self._n_buf:  # stored now and again when more rows fill it (a write replaces the chunk)
            self._submit(self.n, self._buf.copy())
        while self._pending:
            self._store_one()

    def close(self) -> None:
        """Flush, then stop the threads."""
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop the threads without storing anything more."""
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
