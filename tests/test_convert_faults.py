"""Writes that fail for real: a filesystem that fills up, a convert killed with SIGKILL.

Whatever happens, the destination holds either its old state or a complete new store,
never a partial one, and nothing is leaked: a killed writer's temp directory is removed
by the next writer into that directory, which says so. The small filesystems are real
tmpfs mounts (root only; the tests skip elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mer.errors import MerError
from mer.quant.expert import ExpertFormat
from mer.store.convert import convert
from mer.store.reader import Store
from mer.synth.checkpoint import hf_config, write_hf_checkpoint
from mer.synth.store import write_random_store


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(size) -> the root of a fresh tmpfs of that size, unmounted after the test."""
    mounted = []

    def make(size: str) -> Path:
        path = tmp_path / f"fs-{len(mounted)}"
        path.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def store_nbytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir())


def fill_up(fs: Path) -> None:
    """Take every free byte of the filesystem `fs` with a file of its own."""
    with open(fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
        # Less than a buffer may remain; take it byte by byte.
        try:
            while True:
                f.write(b"\0")
                f.flush()
        except OSError:
            pass


def test_convert_refuses_early_when_the_store_cannot_fit(hf_tiny, store_factory, small_fs):
    need = store_nbytes(store_factory("int4"))
    fs = small_fs(f"{need // 2 // 4096 * 4096}")
    with pytest.raises(MerError) as e:
        convert(hf_tiny[0], fs / "out", group_size=32, progress=False)
    msg = one_line(e)
    assert "space" in msg and ("MiB" in msg or "KiB" in msg)
    assert os.listdir(fs) == []


def test_cli_disk_full_is_one_line_and_leaves_nothing(hf_tiny, store_factory, small_fs):
    need = store_nbytes(store_factory("int4"))
    fs = small_fs(f"{need // 2 // 4096 * 4096}")
    r = subprocess.run(
        [sys.executable, "-m", "mer.cli", "convert", str(hf_tiny[0]), str(fs / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "space" in lines[0]
    assert os.listdir(fs) == []


def fill_during_encode(monkeypatch, fs: Path, at_call: int = 3) -> None:
    """Something else fills the disk after the free-space check passed (mid-convert)."""
    real, calls = ExpertFormat.encode, {"n": 0}

    def encode(self, *a):
        calls["n"] += 1
        if calls["n"] == at_call:
            fill_up(fs)
        return real(self, *a)

    monkeypatch.setattr(ExpertFormat, "encode", encode)


def test_disk_filling_up_mid_convert_is_one_line_and_removes_the_temp(
    hf_tiny, small_fs, monkeypatch
):
    fs = small_fs("8m")
    fill_during_encode(monkeypatch, fs)
    with pytest.raises(MerError) as e:
        convert(hf_tiny[0], fs / "out", group_size=32, progress=False)
    msg = one_line(e)
    assert "space" in msg and "needs" in msg
    assert os.listdir(fs) == ["filler"]
    # The space is back once the other file goes; the next convert succeeds.
    (fs / "filler").unlink()
    monkeypatch.undo()
    convert(hf_tiny[0], fs / "out", group_size=32, progress=False)
    assert Store(fs / "out").config.num_hidden_layers == 2


def test_disk_full_during_force_keeps_the_old_store(hf_tiny, store_factory, small_fs, monkeypatch):
    fs = small_fs("8m")
    old = fs / "out"
    shutil.copytree(store_factory("int8"), old)
    before = (old / "manifest.json").read_bytes()
    fill_during_encode(monkeypatch, fs)
    with pytest.raises(MerError) as e:
        convert(hf_tiny[0], old, group_size=32, force=True, progress=False)
    assert "space" in one_line(e)
    assert sorted(os.listdir(fs)) == ["filler", "out"]
    assert (old / "manifest.json").read_bytes() == before
    Store(old)


def test_synth_writers_report_a_full_disk_in_one_line(small_fs):
    fs = small_fs("256k")
    cfg = hf_config("tiny")
    with pytest.raises(MerError) as e:
        write_random_store(fs / "store", hf_config("small"), progress=False)
    assert "space" in one_line(e)
    with pytest.raises(MerError) as e:
        write_hf_checkpoint(fs / "ck", {**cfg, "vocab_size": 4096}, progress=False)
    assert "space" in one_line(e)
    assert os.listdir(fs) == []


@pytest.mark.parametrize("writer", ["synth --store", "synth"])
def test_synth_writers_when_the_disk_fills_up_mid_write(small_fs, monkeypatch, writer):
    import mer.synth.checkpoint as checkpoint
    import mer.synth.store as store

    fs = small_fs("8m")
    module, name = (
        (store, "random_int4_extent") if "--store" in writer else (checkpoint, "random_tensor")
    )
    real, calls = getattr(module, name), {"n": 0}

    def make(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            fill_up(fs)
        return real(*a)

    monkeypatch.setattr(module, name, make)
    with pytest.raises(MerError) as e:
        if "--store" in writer:
            write_random_store(fs / "out", hf_config("tiny"), progress=False)
        else:
            write_hf_checkpoint(fs / "out", hf_config("tiny"), progress=False)
    assert "space" in one_line(e) and "needs" in str(e.value)
    assert os.listdir(fs) == ["filler"]


# SIGKILL at several points of a real `mer convert`.


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory):
    """A checkpoint large enough that a convert takes a while (about 25 MB of experts)."""
    path = tmp_path_factory.mktemp("kill") / "ck"
    return write_hf_checkpoint(path, hf_config("small"), progress=False)


def temps(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n)


def verify_complete(path: Path) -> str:
    """Open the store and check every checksum; return its manifest text."""
    s = Store(path)
    s.load_dense()
    raw = s.expert_path.read_bytes()
    for (layer, e), x in s.extents.items():
        s.verify_expert(layer, e, raw[x.offset : x.offset + x.length])
    return (path / "manifest.json").read_text()


def kill_convert(src: Path, dst: Path, delay: float, force: bool) -> str:
    """Start `mer convert`, SIGKILL it `delay` s after its temp dir appears; say where it was."""
    cmd = [sys.executable, "-m", "mer.cli", "convert", str(src), str(dst), "--quant", "int8"]
    proc = subprocess.Popen(cmd + (["--force"] if force else []), stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not temps(dst.parent):
            time.sleep(0.002)
        time.sleep(delay)
        state = "finished" if proc.poll() is not None else "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return state


def test_sigkill_at_any_point_leaves_old_or_new_and_the_next_convert_cleans_up(
    slow_source, hf_tiny, tmp_path, capfd
):
    dst = tmp_path / "out"
    states, stale_seen, old_manifest = [], 0, None
    for force, delay in [(0, 0.0), (0, 0.4), (1, 0.0), (1, 0.3), (1, 0.9)]:
        if not force:
            shutil.rmtree(dst, ignore_errors=True)
        elif old_manifest is None:  # the old state: a random int4 store of the same shape
            shutil.rmtree(dst, ignore_errors=True)
            write_random_store(dst, hf_config("small"), progress=False)
            old_manifest = verify_complete(dst)
        states.append(kill_convert(slow_source, dst, delay, bool(force)))
        if dst.exists():
            text = verify_complete(dst)  # complete, every checksum right: old or new
            if text != old_manifest:
                assert json.loads(text)["experts"]["format"]["scheme"] == "int8"
                old_manifest = None  # replaced: the next forced run starts from int4 again
        else:
            assert not force, f"a forced convert killed {delay} s in lost the old store"
        if temps(tmp_path):
            stale_seen += 1
            # The next convert into this directory removes the dead one's temp and says so.
            capfd.readouterr()
            convert(hf_tiny[0], tmp_path / "other", group_size=32, progress=False)
            assert "removed" in capfd.readouterr().err
            shutil.rmtree(tmp_path / "other")
        assert temps(tmp_path) == []
        assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    assert stale_seen >= 2, f"no kill landed mid-write: {states}"


def dead_pid() -> int:
    """A pid no process has right now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_replacing_without_an_atomic_exchange(store_factory, hf_tiny, tmp_path, monkeypatch):
    """Where the filesystem has no RENAME_EXCHANGE the old store is set aside, the new moved
    in; a writer killed between the two leaves the old one aside, and the next restores it."""
    import mer.store.staging as staging

    dst = tmp_path / "out"
    shutil.copytree(store_factory("int8"), dst)
    monkeypatch.setattr(staging, "_renameat2", lambda src, dst, flags: False)
    convert(hf_tiny[0], dst, group_size=32, force=True, progress=False)
    assert Store(dst).expert_format.scheme == "int4" and os.listdir(tmp_path) == ["out"]

    # The state a kill between the two renames leaves: the old store aside, nothing at dst.
    pid = dead_pid()
    os.rename(dst, tmp_path / f".out.tmp-{pid}.old")
    shutil.copytree(store_factory("int8"), tmp_path / f".out.tmp-{pid}")
    convert(hf_tiny[0], tmp_path / "other", group_size=32, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]
    assert Store(dst).expert_format.scheme == "int4"  # the old state, restored


def test_temp_dirs_of_live_processes_are_left_alone(hf_tiny, tmp_path):
    live = tmp_path / f".x.tmp-{os.getppid()}"
    live.mkdir()
    dead = tmp_path / f".y.tmp-{dead_pid()}"
    dead.mkdir()
    (dead / "experts.bin").write_bytes(b"\0" * 4096)
    convert(hf_tiny[0], tmp_path / "out", group_size=32, progress=False)
    assert live.is_dir() and not dead.exists()
