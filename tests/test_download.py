"""``calopc download`` against a local HTTP server on 127.0.0.1 (no test reaches the internet)."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("pooch")

from calopc import download as dl  # noqa: E402
from calopc.cli import main  # noqa: E402

MB = 1_000_000


class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}  # name -> bytes to send before dropping the connection (once)
        self.corrupt: set[str] = set()  # names served with one byte changed
        self.ranges = True  # False: ignore Range requests (answer 200 with the whole file)
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header) of every GET
        self.sent: dict[str, int] = {}  # body bytes sent per name


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        st: _State = self.server.state  # type: ignore[attr-defined]
        name = self.path.lstrip("/").split("?")[0]
        rng = self.headers.get("Range")
        st.requests.append((name, rng))
        if name not in st.files:
            self.send_error(404, "Not Found")
            return
        data = st.files[name]
        if name in st.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and st.ranges:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = st.cut.pop(name, None)
        if cut is not None:
            body = body[:cut]
            self.close_connection = True
        self.wfile.write(body)
        st.sent[name] = st.sent.get(name, 0) + len(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    """A threaded HTTP server with Range support on 127.0.0.1, stopped after the test."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def remote(server, monkeypatch):
    """Two files of 'dataset 2' (3 MB and 1 MB of seeded bytes) served by ``server``, with their md5 sums."""
    import numpy as np

    rng = np.random.default_rng(7)
    st: _State = server.state
    st.files = {"dataset_2_1.hdf5": rng.bytes(3 * MB), "dataset_2_2.hdf5": rng.bytes(MB)}
    files = tuple(dl.RemoteFile(name, "2", 1, hashlib.md5(data).hexdigest(), role, len(data))
                  for (name, data), role in zip(st.files.items(), ("train", "reference")))
    monkeypatch.setattr(dl, "FILES", files)
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    return f"http://127.0.0.1:{server.server_address[1]}", st


def _run(args: list[str]) -> int:
    return main(["download", *args, "--no-progress"])


def _error(capsys) -> str:
    """The error line of the last command (progress messages come before it on stderr)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("calopc download: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in "".join(lines)
    return errors[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "tmp")))


def test_download_writes_verified_files(remote, tmp_path, capsys):
    """Every file of the dataset arrives under its name with the published md5 sum, no temporary file left."""
    url, st = remote
    out = tmp_path / "data"
    assert _run(["2", "--dir", str(out), "--mirror", url]) == 0
    for name, data in st.files.items():
        assert (out / name).read_bytes() == data
    assert _leftovers(out) == []
    assert "2 files in" in capsys.readouterr().out


def test_existing_good_file_is_verified_not_downloaded(remote, tmp_path, capsys):
    """A file already present with the right md5 is not requested from the server again."""
    url, st = remote
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url]) == 0
    n = len(st.requests)
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url]) == 0
    assert len(st.requests) == n
    assert "dataset_2_1.hdf5: verified" in capsys.readouterr().err


def test_mirror_from_environment(remote, tmp_path, monkeypatch):
    """CALOPC_DATA_URL points the download at a mirror without any option."""
    url, st = remote
    monkeypatch.setenv(dl.MIRROR_ENV, url)
    assert _run(["2", "--dir", str(tmp_path), "--files", "dataset_2_2"]) == 0
    assert (tmp_path / "dataset_2_2.hdf5").read_bytes() == st.files["dataset_2_2.hdf5"]
    assert st.requests == [("dataset_2_2.hdf5", None)]


def test_interrupted_transfer_is_resumed(remote, tmp_path, capsys):
    """A dropped connection keeps what arrived; the next run asks only for the rest (HTTP Range)."""
    url, st = remote
    name, data = "dataset_2_1.hdf5", st.files["dataset_2_1.hdf5"]
    st.cut[name] = 1_500_000
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url, "--files", name]) == 2
    err = _error(capsys)
    assert err.startswith("calopc download: error: dataset_2_1.hdf5: the transfer stopped after")
    assert "resume" in err
    assert not (tmp_path / name).exists()
    partial = tmp_path / f".{name}.partial"
    kept = partial.stat().st_size
    assert 0 < kept <= 1_500_000
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url, "--files", name]) == 0
    assert (tmp_path / name).read_bytes() == data
    assert st.requests[-1] == (name, f"bytes={kept}-")
    assert st.sent[name] == 1_500_000 + len(data) - kept  # the second request sent only the rest
    assert _leftovers(tmp_path) == []


def test_server_without_ranges_restarts(remote, tmp_path, capsys):
    """A server that ignores Range sends the whole file again, and the result is still exact."""
    url, st = remote
    name = "dataset_2_1.hdf5"
    st.cut[name] = 1_200_000
    st.ranges = False
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url, "--files", name]) == 2
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url, "--files", name]) == 0
    assert (tmp_path / name).read_bytes() == st.files[name]
    assert "does not resume transfers" in capsys.readouterr().err


def test_checksum_mismatch_leaves_nothing(remote, tmp_path, capsys):
    """A transfer that does not match its md5 sum is removed: nothing under the final name, no partial file."""
    url, st = remote
    st.corrupt.add("dataset_2_2.hdf5")
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url]) == 2
    err = _error(capsys)
    assert err.startswith("calopc download: error: dataset_2_2.hdf5: the downloaded file does not match the "
                          "published md5 sum")
    assert not (tmp_path / "dataset_2_2.hdf5").exists()
    assert (tmp_path / "dataset_2_1.hdf5").exists()  # the file before it verified and stays
    assert _leftovers(tmp_path) == []


def test_existing_bad_file_is_replaced_only_by_a_verified_copy(remote, tmp_path):
    """A present file with the wrong md5 is downloaded again; a failed new copy leaves the old file as it was."""
    url, st = remote
    name = "dataset_2_2.hdf5"
    (tmp_path / name).write_bytes(b"not the dataset")
    st.corrupt.add(name)
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url, "--files", name]) == 2
    assert (tmp_path / name).read_bytes() == b"not the dataset"
    st.corrupt.clear()
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url, "--files", name]) == 0
    assert (tmp_path / name).read_bytes() == st.files[name]


def test_offline_is_one_line(remote, tmp_path, capsys):
    """No server listening (connection refused): one line naming the host, nothing written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _run(["2", "--dir", str(tmp_path / "d"), "--mirror", f"http://127.0.0.1:{port}"]) == 2
    err = _error(capsys)
    assert err == (f"calopc download: error: dataset_2_1.hdf5: cannot reach 127.0.0.1:{port} (connection refused); "
                   "check the network connection, or use a mirror (--mirror URL or CALOPC_DATA_URL)")
    assert list((tmp_path / "d").iterdir()) == []


def test_http_error_is_one_line(remote, tmp_path, capsys):
    """A file the server does not have (HTTP 404) is reported in one line."""
    url, st = remote
    del st.files["dataset_2_2.hdf5"]
    assert _run(["2", "--dir", str(tmp_path), "--mirror", url, "--files", "dataset_2_2.hdf5"]) == 2
    assert "HTTP 404" in _error(capsys)
    assert not (tmp_path / "dataset_2_2.hdf5").exists()


def test_ctrl_c_keeps_the_partial_transfer(remote, tmp_path, monkeypatch):
    """Ctrl-C during a transfer keeps what arrived for the next run and leaves nothing under the final name."""
    url, st = remote
    from calopc import progress

    def interrupt(self, n=1, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(progress.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt, match="partial download"):
        dl.download("2", tmp_path, files=["dataset_2_1.hdf5"], base_url=url, progress=False, log=lambda s: None)
    assert not (tmp_path / "dataset_2_1.hdf5").exists()
    assert (tmp_path / ".dataset_2_1.hdf5.partial").stat().st_size >= MB


def test_second_download_of_the_same_file_is_refused(remote, tmp_path):
    """While another process downloads a file, a second download stops at once with a line naming the holder."""
    import subprocess
    import sys

    url, _ = remote
    from calopc.locking import OutputLocked

    holder = ("import sys; from calopc._safety import lock_output\n"
              "with lock_output(sys.argv[1], what='download'):\n"
              "    print('held', flush=True); sys.stdin.read()\n")
    with subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "dataset_2_1.hdf5")], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "held"
            with pytest.raises(OutputLocked, match=rf"dataset_2_1.hdf5.*PID {proc.pid}"):
                dl.download("2", tmp_path, base_url=url, progress=False, log=lambda s: None)
        finally:
            proc.stdin.close()
    assert not (tmp_path / "dataset_2_1.hdf5").exists()


def test_downloaded_synthetic_file_is_usable(server, tmp_path, monkeypatch, capsys):
    """A shower file that arrives through the download reads with calopc info like the original."""
    from calopc.synth import write_synthetic

    src = tmp_path / "src.hdf5"
    write_synthetic(src, dataset="1-photons", n=20, seed=1, progress=False)
    data = src.read_bytes()
    server.state.files = {"dataset_1_photons_1.hdf5": data}
    monkeypatch.setattr(dl, "FILES", (dl.RemoteFile("dataset_1_photons_1.hdf5", "1-photons", 1,
                                                    hashlib.md5(data).hexdigest(), "train", len(data)),))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    assert _run(["1-photons", "--dir", str(tmp_path / "data"), "--mirror", url]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "data" / "dataset_1_photons_1.hdf5"), "--no-progress"]) == 0
    assert "dataset 1-photons (368 voxels), 20 showers" in capsys.readouterr().out


def test_unknown_names_are_refused(capsys):
    """A file name that is not in the dataset is a one-line error listing the valid names."""
    assert _run(["3", "--files", "dataset_2_1.hdf5", "--dry-run"]) == 2
    err = _error(capsys)
    assert "dataset_3_1.hdf5, dataset_3_2.hdf5, dataset_3_3.hdf5, dataset_3_4.hdf5" in err


def test_default_source_is_the_zenodo_record(monkeypatch):
    """Without a mirror every file comes from its dataset's Zenodo record."""
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)
    records = {"1-photons": 8099322, "1-pions": 8099322, "2": 6366271, "3": 6366324}
    assert len(dl.select_files("all")) == 10
    for f in dl.select_files("all"):
        assert dl.file_url(f) == f"https://zenodo.org/records/{records[f.dataset]}/files/{f.name}?download=1"
        assert re.fullmatch(r"[0-9a-f]{32}", f.md5)
