r"""Download the CaloChallenge 2022 datasets from their Zenodo records, checked against their md5 sums.

Nothing downloads by itself: only :func:`download` (``calopc download``) reaches the network. Every file
is checked against the md5 sum published with the dataset:

* a file already in the folder is verified (its md5 computed) and kept when it matches: nothing is
  transferred; one that does not match is downloaded again and replaced only once the new copy verifies;
* a transfer goes to ``.NAME.partial`` beside the target. An interrupted transfer (lost connection,
  Ctrl-C) keeps it, and the next run resumes it with an HTTP ``Range`` request; a server that does not
  support ranges sends the whole file again;
* the complete transfer is verified before it is renamed to its final name (through pooch); a checksum
  mismatch removes it, so nothing is ever left under the final name unless it matches;
* a second ``calopc download`` of the same file does not wait: it stops at once with a line naming the
  process that holds the file (:func:`calopc.io.lock_output`).

The files come from ``https://zenodo.org/records/RECORD/files/NAME``. A mirror that serves the same
files under one base URL (``BASE/NAME``) is used with ``base_url=`` (``--mirror``) or the environment
variable :data:`MIRROR_ENV` (``CALOPC_DATA_URL``); the md5 sums are checked all the same.

Needs the ``download`` extra (``pip install 'calopc[download]'``: pooch and requests).
"""

from __future__ import annotations

__all__ = ["DOWNLOAD_DATASETS", "FILES", "MIRROR_ENV", "DownloadError", "RemoteFile", "download", "file_url",
           "select_files"]

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: environment variable with the base URL of a mirror (files at ``BASE/NAME``); overrides Zenodo
MIRROR_ENV = "CALOPC_DATA_URL"
#: the dataset names :func:`download` accepts (``all``: every file of every dataset)
DOWNLOAD_DATASETS = ("1-photons", "1-pions", "2", "3", "all")

_ZENODO = "https://zenodo.org/records/{record}/files/{name}?download=1"
_CHUNK = 1 << 18  # bytes per read of the response body (a dropped connection loses at most this)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a CaloChallenge dataset on Zenodo.

    Attributes:
        name: the file name, e.g. ``dataset_2_1.hdf5``.
        dataset: ``1-photons``, ``1-pions``, ``2`` or ``3``.
        record: the Zenodo record number.
        md5: the published md5 sum (32 hex digits).
        role: ``train`` or ``reference`` (the evaluation's convention).
        size: the size in bytes where known, else ``None``.
    """

    name: str
    dataset: str
    record: int
    md5: str
    role: str
    size: int | None = None


#: every file of the four datasets: Zenodo records 8099322 (dataset 1), 6366271 (dataset 2), 6366324 (dataset 3)
FILES: tuple[RemoteFile, ...] = (
    RemoteFile("dataset_1_photons_1.hdf5", "1-photons", 8099322, "005d2adeda7db034b388112661265656", "train",
               173_797_023),
    RemoteFile("dataset_1_photons_2.hdf5", "1-photons", 8099322, "4767715ed56e99565fd9c67340661e70", "reference"),
    RemoteFile("dataset_1_pions_1.hdf5", "1-pions", 8099322, "6a5f52722064a1bcd8a0bc002f16515d", "train"),
    RemoteFile("dataset_1_pions_2.hdf5", "1-pions", 8099322, "fee7457b40127bc23c8ab909e2638ca0", "reference"),
    RemoteFile("dataset_2_1.hdf5", "2", 6366271, "e590333e9a2da51b258288d74bd8357a", "train", 1_356_475_617),
    RemoteFile("dataset_2_2.hdf5", "2", 6366271, "7a56fd68aa53ded37c2ac445694d9736", "reference", 1_366_708_391),
    RemoteFile("dataset_3_1.hdf5", "3", 6366324, "d33f03418aa311b0965452fcbef1ff87", "train"),
    RemoteFile("dataset_3_2.hdf5", "3", 6366324, "911dec2c40aafa64a07b7450b80881bf", "train"),
    RemoteFile("dataset_3_3.hdf5", "3", 6366324, "5ea62f6831a1821bb5035fafc9f030e8", "reference"),
    RemoteFile("dataset_3_4.hdf5", "3", 6366324, "5e8d82e6a6c28c6914a3b602a1cfa299", "reference"),
)


class DownloadError(OSError):
    """A download that could not be completed: no network, an HTTP error or a checksum mismatch (one line)."""


def select_files(datasets: str | Iterable[str], names: Iterable[str] | None = None) -> list[RemoteFile]:
    """The files of ``datasets`` (``1-photons``, ``1-pions``, ``2``, ``3`` or ``all``), optionally only ``names``.

    Args:
        datasets: one dataset name or several.
        names: file names (``dataset_3_1.hdf5``; the ``.hdf5`` may be left out) to keep; ``None``: all of them.

    Raises:
        ValueError: an unknown dataset, or a name that is not a file of the selected datasets (the message
            lists the valid names).
    """
    wanted = [datasets] if isinstance(datasets, str) else list(datasets)
    for d in wanted:
        if d not in DOWNLOAD_DATASETS:
            msg = f"unknown dataset {d!r}; expected one of {', '.join(DOWNLOAD_DATASETS)}"
            raise ValueError(msg)
    files = [f for f in FILES if "all" in wanted or f.dataset in wanted]
    if names is None:
        return files
    by_name = {f.name: f for f in files}
    chosen: list[RemoteFile] = []
    for n in names:
        key = n if n.endswith(".hdf5") else f"{n}.hdf5"
        if key not in by_name:
            msg = (f"{n!r} is not a file of dataset {', '.join(wanted)}; expected one of "
                   f"{', '.join(by_name)}")
            raise ValueError(msg)
        if by_name[key] not in chosen:
            chosen.append(by_name[key])
    return chosen


def file_url(f: RemoteFile, base_url: str | None = None) -> str:
    """Where ``f`` is downloaded from: ``base_url`` or ``$CALOPC_DATA_URL`` + ``/NAME`` if set, else Zenodo."""
    base = base_url if base_url is not None else os.environ.get(MIRROR_ENV) or None
    if base:
        return f"{base.rstrip('/')}/{f.name}"
    return _ZENODO.format(record=f.record, name=f.name)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _partial_path(target: Path) -> Path:
    """The resumable transfer of ``target``: ``.NAME.partial`` beside it (kept across runs, unlike ``.part``)."""
    return target.with_name(f".{target.name}.partial")


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class _ResumableDownloader:
    """A pooch downloader that appends to ``.NAME.partial`` with HTTP ``Range`` requests.

    pooch calls it with a temporary output path; the complete transfer is renamed to that path, and
    pooch then verifies the md5 sum and renames it to the target.
    """

    def __init__(self, f: RemoteFile, target: Path, *, timeout: float, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.f, self.target, self.timeout, self.progress, self.log = f, target, timeout, progress, log

    def __call__(self, url: str, output_file: str, pooch: object = None) -> None:
        import requests

        from .progress import Progress

        part = _partial_path(self.target)
        have = part.stat().st_size if part.exists() else 0
        if self.f.size is not None and have > self.f.size:  # not a prefix of this file: start again
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            resp = requests.get(url, headers=headers, stream=True, timeout=self.timeout)
        except requests.RequestException as err:
            msg = f"{self.f.name}: cannot reach {_host(url)} ({_reason(err)}); check the network connection"
            if not os.environ.get(MIRROR_ENV):
                msg += f", or use a mirror (--mirror URL or {MIRROR_ENV})"
            raise DownloadError(msg) from None
        with resp:
            if resp.status_code == 416 and have:  # the partial file already holds the whole file
                os.replace(part, output_file)
                return
            if resp.status_code not in (200, 206):
                msg = f"{self.f.name}: {url} answered HTTP {resp.status_code} {resp.reason}; expected the file"
                raise DownloadError(msg)
            if resp.status_code == 200 and have:
                self.log(f"{self.f.name}: the server does not resume transfers; downloading it again from the start")
                have = 0
            elif have:
                self.log(f"{self.f.name}: resuming after {_mb(have)}")
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else self.f.size
            from ._safety import check_writable

            check_writable(self.target, expected_bytes=(total or 0) - have)
            done = have
            shown = have // 1_000_000
            try:
                with open(part, "ab" if have else "wb") as out, \
                        Progress(None if total is None else total // 1_000_000, f"download {self.f.name}", unit="MB",
                                 enabled=self.progress, initial=shown) as bar:
                    for block in resp.iter_content(_CHUNK):
                        out.write(block)
                        done += len(block)
                        if done // 1_000_000 > shown:
                            bar.update(done // 1_000_000 - shown)
                            shown = done // 1_000_000
            except OSError as err:  # writing the partial file (disk full, ...); requests' errors are OSErrors too
                if isinstance(err, requests.RequestException):
                    msg = (f"{self.f.name}: the transfer stopped after {_mb(done)}"
                           f"{'' if total is None else ' of ' + _mb(total)} ({_reason(err)}); run the same command "
                           "again to resume it")
                    raise DownloadError(msg) from None
                from ._safety import OutputError

                msg = (f"{part}: cannot write ({err.strerror or err}); what was received ({_mb(done)}) is kept there, "
                       "run the same command again to resume it")
                raise OutputError(msg) from err
            except KeyboardInterrupt as err:
                if not str(err):  # the CLI prints this as the detail of "interrupted"
                    err.args = (f"the partial download ({_mb(done)}) is kept in {part}; run the same command again "
                                "to resume it",)
                raise
        if total is not None and done < total:
            msg = (f"{self.f.name}: the transfer stopped after {_mb(done)} of {_mb(total)}; run the same command "
                   "again to resume it")
            raise DownloadError(msg)
        os.replace(part, output_file)


def _reason(err: BaseException) -> str:
    """The innermost cause of a requests error, short: ``connection refused``, ``timed out``."""
    text = str(err)
    for key in ("connection refused", "name or service not known", "temporary failure in name resolution",
                "network is unreachable", "timed out", "connection reset", "incompleteread", "connection broken"):
        if key in text.lower():
            return "incomplete read" if key == "incompleteread" else key
    return type(err).__name__


@contextlib.contextmanager
def _quiet_pooch() -> Iterable[None]:
    """pooch logs every fetch at INFO; calopc writes its own lines."""
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def download(dataset: str | Sequence[str] = "2", folder: str | os.PathLike = ".", *,
             files: Iterable[str] | None = None, base_url: str | None = None, progress: bool = True,
             timeout: float = 60.0, log: Callable[[str], None] | None = None) -> list[Path]:
    """Download the files of a CaloChallenge dataset into ``folder``, each verified against its md5 sum.

    Args:
        dataset: ``1-photons``, ``1-pions``, ``2``, ``3`` or ``all`` (or several of them).
        folder: where the files go (created if missing). Files already there are verified, not downloaded.
        files: only these file names of the dataset (e.g. ``["dataset_3_1.hdf5"]``); default: all of them.
        base_url: a mirror serving the files as ``BASE/NAME`` (default: ``$CALOPC_DATA_URL``, else Zenodo).
        progress: a progress bar on a terminal, a log line every ~30 s elsewhere.
        timeout: seconds to wait for the server to connect or to send more data.
        log: where the one-line messages go (default: standard error).

    Returns:
        The paths of the verified files, in the order of :data:`FILES`.

    Raises:
        ValueError: an unknown dataset or file name.
        DownloadError: the server cannot be reached, answers with an HTTP error, the transfer stops
            (what was received is kept and resumed by the next call) or the md5 sum does not match
            (the transfer is removed). Nothing is ever left under a final name that does not match.
        calopc.io.OutputError: ``folder`` is not writable or has too little free space.
        calopc.locking.OutputLocked: another process is downloading the same file.
        ModuleNotFoundError: pooch is not installed (``pip install 'calopc[download]'``).
    """
    import sys

    from ._extras import pooch as _pooch
    from ._safety import OutputError, check_writable, lock_output

    chosen = select_files(dataset, files)
    pooch = _pooch()
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    folder = Path(folder)
    check_writable(folder, folder=True)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for f in chosen:
        target = folder / f.name
        if target.is_dir():
            msg = f"{target}: is a folder; expected the file {f.name} (or another --dir)"
            raise OutputError(msg)
        with lock_output(target, what="download"):
            if target.exists():
                log(f"{f.name}: present; verifying its md5 sum")
                found = _md5(target)
                if found == f.md5:
                    log(f"{f.name}: verified (md5 {f.md5})")
                    out.append(target)
                    continue
                log(f"{f.name}: md5 {found} does not match the published {f.md5}; downloading it again "
                    "(the file is replaced only once the new copy verifies)")
            url = file_url(f, base_url)
            log(f"{f.name}: downloading from {url}")
            downloader = _ResumableDownloader(f, target, timeout=timeout, progress=progress, log=log)
            try:
                with _quiet_pooch():
                    pooch.retrieve(url, known_hash=f"md5:{f.md5}", fname=f.name, path=folder, downloader=downloader)
            except ValueError as err:  # pooch's checksum mismatch (it has removed the transfer)
                if "hash" not in str(err):
                    raise
                msg = (f"{f.name}: the downloaded file does not match the published md5 sum {f.md5} (a corrupted "
                       "transfer or a changed file on the server); it was removed, nothing was kept under "
                       f"{target}; run the same command again")
                raise DownloadError(msg) from None
            log(f"{f.name}: downloaded and verified (md5 {f.md5})")
            out.append(target)
    return out
