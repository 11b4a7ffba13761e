"""`prepare` never hangs, never loops, never clobbers; a damaged .beton is found (issue 17, part 3).

- links in an image folder are followed, loops are cut and every file is counted once;
- an image that cannot be stored (1 x 3000 px) is named, or left out with --skip-bad; a
  writer process that raises or dies ends the write (no hang, nothing left behind);
- an existing .beton or sidecar is replaced only with --overwrite, the sidecar last;
- the sidecar's checksum finds bytes changed inside the image data (`fastprompt verify`),
  opening checks the header and tables every time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.data import open_dataset, write_demo
from fastprompt.data.beton import WriteOptions, write_beton
from fastprompt.data.imagefolder import collect_imagefolder
from fastprompt.errors import FastpromptError

runner = CliRunner()


def cli(*args):
    """`fastprompt ARGS...` in this process: a click `Result`."""
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


# ----------------------------------------------------------------------------------------
# links: followed, loops cut, each file once


def test_link_loops_are_cut_and_each_file_counted_once(tmp_path, make_tree, caplog):
    root = tmp_path / "pets"
    make_tree(root, {f"{c}/{k}.png": (12, 12) for c in ("cat", "dog") for k in range(5)})
    (root / "cat" / "self").symlink_to(".")  # two loops: a plain os.walk(followlinks=True) never ends
    (root / "cat" / "up").symlink_to("..")
    (root / "cat" / "dogs").symlink_to("../dog")  # another class's folder: its images stay dog's
    (root / "dog" / "again.png").symlink_to("0.png")  # the same file under a second name
    elsewhere = tmp_path / "more_dogs"
    make_tree(elsewhere, {"5.png": (12, 12), "6.png": (12, 12)}, seed=3)
    (root / "dog" / "extra").symlink_to(elsewhere)  # a linked folder of new images is followed

    with caplog.at_level(logging.WARNING, logger="fastprompt.data.scan"):
        samples, names, _, _ = collect_imagefolder(root)
    paths = sorted(s.path for s in samples)
    assert names == ["cat", "dog"]
    assert paths == [f"cat/{k}.png" for k in range(5)] + [f"dog/{k}.png" for k in range(5)] + ["dog/extra/5.png", "dog/extra/6.png"]
    assert [s.label for s in sorted(samples, key=lambda s: s.path)] == [0] * 5 + [1] * 7
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "3 linked folder(s) lead to a folder already scanned" in warnings[0] and "e.g. cat/dogs" in warnings[0]
    assert "1 image path(s) lead to a file already counted" in warnings[1] and "dog/again.png (same file as dog/0.png)" in warnings[1]


def test_split_folders_count_a_linked_file_once(tmp_path, make_tree):
    root = tmp_path / "bugs"
    make_tree(root, {f"{s}/{c}/{k}.png": (12, 12) for s in ("train", "test") for c in ("ant", "bee") for k in range(3)})
    (root / "test" / "ant" / "leak.png").symlink_to("../../train/ant/0.png")  # a train image again in test
    (root / "test" / "bee" / "loop").symlink_to("../..")  # back to ROOT: every split again
    samples, _, _, _ = collect_imagefolder(root)
    paths = [s.path for s in samples]
    assert len(paths) == len(set(paths)) == 12
    assert "test/ant/leak.png" not in paths and not any("loop" in p for p in paths)
    assert sorted(p for p, s in ((s.path, s.split) for s in samples) if s == "test") == [
        f"test/{c}/{k}.png" for c in ("ant", "bee") for k in range(3)]


def test_two_class_folders_that_are_one_folder(tmp_path, make_tree):
    root = tmp_path / "pets"
    make_tree(root, {f"{c}/{k}.png": (12, 12) for c in ("cat", "dog") for k in range(4)})
    (root / "hound").symlink_to("dog")
    with pytest.raises(FastpromptError, match=r"hound and .*dog are the same folder \(one links to the other\); remove one"):
        collect_imagefolder(root)
    (root / "hound").unlink()
    (root / "cat" / "shadow.png").symlink_to("../dog/0.png")  # counted once: under cat (sorted first)
    samples, _, _, _ = collect_imagefolder(root)
    assert sorted(s.path for s in samples if s.label == 1) == ["dog/1.png", "dog/2.png", "dog/3.png"]
    for k in range(4):
        (root / "dog" / f"{k}.png").unlink()
        (root / "dog" / f"{k}.png").symlink_to(f"../cat/{k}.png")
    with pytest.raises(FastpromptError, match=r"class folder .*dog has no images .*\(its 4 image\(s\) are links to files already counted"):
        collect_imagefolder(root)


# ----------------------------------------------------------------------------------------
# images that cannot be stored; writer processes that fail


def test_degenerate_image_is_named_or_skipped(tmp_path, make_tree, list_files):
    root = tmp_path / "src"
    make_tree(root, {f"{c}/{k}.png": (12, 12) for c in ("ant", "bee") for k in range(4)})
    Image.fromarray(np.full((1, 3000, 3), 128, dtype=np.uint8)).save(root / "bee" / "streak.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = error_line(cli("prepare", "imagefolder", root, "--out", out_dir / "x.beton", "--workers", 1))
    assert f"image {root / 'bee' / 'streak.png'} is unusable (UnusableImage: 3000x1 px: " in line
    assert "--skip-bad" in line and list_files(out_dir) == []

    result = cli("prepare", "imagefolder", root, "--out", out_dir / "x.beton", "--workers", 1, "--skip-bad")
    assert result.exit_code == 0, result.output
    ds = open_dataset(out_dir / "x.beton")
    assert ds.num_samples == 8 and ds.meta["source"]["skipped"] == [str(root / "bee" / "streak.png")]


def test_storage_problem_names_the_geometry():
    from fastprompt.data.pixels import storage_problem

    # stored for training (caps 320 / 1024): 1 x 3000 shrinks its 1 px side to int(1024 / 3000) = 0
    assert storage_problem(1, 3000, None, 320, 1024) == (
        "3000x1 px: stored for training (longer side at most 1024 px, shorter at most 320 px) its 1 px side would "
        "shrink to 0 px")
    assert storage_problem(3, 3000, None, 320, 1024) is None  # 3 x 1024 after the cap: thin, but an image
    assert storage_problem(1, 1000, None, 320, 1024) is None  # under the caps: stored as it is
    # evaluation-ready at 224: CLIP's resize keeps the aspect, 224 x 672000 px before the crop
    assert storage_problem(1, 3000, 224, 320, 1024) == (
        "3000x1 px: CLIP's eval resize to 224 px would make it 672000x224 px, over the 89 Mpx limit")
    assert storage_problem(1, 1000, 224, 320, 1024) is None  # 224 x 224000 = 50 Mpx: allowed


class _Source:
    """Tiny images; `hook(i)` runs inside the writer process before image i is returned."""

    def __init__(self, n: int, hook, side: int = 8):
        self.n, self.hook, self.side, self.parent = n, hook, side, os.getpid()

    def __len__(self) -> int:
        return self.n

    def describe(self, i: int) -> str:
        return f"img{i}.png"

    def load(self, i: int) -> np.ndarray:
        if os.getpid() != self.parent:
            self.hook(i)
        return np.full((self.side, self.side, 3), i, dtype=np.uint8)


def _write(out: Path, source: _Source, workers: int = 1):
    n = len(source)
    return write_beton(out, source, [i % 2 for i in range(n)], ["train", "val", "test", "train"] * (n // 4), ["a", "b"],
                       name="t", template="a photo of a {}.", split_source="test", provenance={"kind": "test"},
                       options=WriteOptions(max_resolution=16, train_short_side=16, eval_size=None, workers=workers))


def _kill_at_5(i: int) -> None:
    if i == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does


def test_a_killed_writer_process_ends_the_write(tmp_path, list_files):
    with pytest.raises(FastpromptError, match=r"a writer process was killed by SIGKILL \(out of memory\?\) at image img5.png"):
        _write(tmp_path / "x.beton", _Source(16, _kill_at_5), workers=2)
    assert list_files(tmp_path) == []  # no .beton.tmp left


def test_a_writer_process_that_raises_ends_the_write(tmp_path, list_files, monkeypatch):
    import fastprompt.data.beton as beton

    real = beton._encode_image

    def disk_full(destination, value, malloc):  # inside FFCV's worker loop, past our own checks
        data, raw, _, _ = value
        if raw and int(data[0]) == 6:  # image 6: stored raw, its pixels are all 6
            raise OSError(28, "No space left on device")
        real(destination, value, malloc)

    monkeypatch.setattr(beton, "_encode_image", disk_full)  # the writer processes are forked: they see it
    n = 8
    with pytest.raises(FastpromptError, match=r"a writer process raised OSError: \[Errno 28\] No space left on device at image img6.png"):
        write_beton(tmp_path / "x.beton", _Source(n, lambda i: None, side=16), [i % 2 for i in range(n)], ["val"] * n, ["a", "b"],
                    name="t", template="a photo of a {}.", split_source="test", provenance={"kind": "test"},
                    options=WriteOptions(max_resolution=16, train_short_side=16, eval_size=16, workers=1))
    assert list_files(tmp_path) == []


# ----------------------------------------------------------------------------------------
# never clobber


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_demo") / "demo.beton"
    write_demo(out, images_per_class=4, image_size=32, workers=1)
    return out


def test_existing_beton_or_sidecar_needs_overwrite(tmp_path, small_demo):
    out = tmp_path / "demo.beton"
    out.write_bytes(small_demo.read_bytes())
    out.with_suffix(".json").write_bytes(small_demo.with_suffix(".json").read_bytes())
    before = {p: p.read_bytes() for p in (out, out.with_suffix(".json"))}
    line = error_line(cli("prepare", "demo", "--out", out, "--images-per-class", 4, "--size", 32, "--workers", 1))
    assert line == f"error: --out {out}: {out} already exists; pass --overwrite to replace it, or choose another --out"
    assert {p: p.read_bytes() for p in before} == before

    settings = tmp_path / "settings.json"  # someone else's file where the sidecar would go
    settings.write_text('{"keep": true}\n')
    line = error_line(cli("prepare", "imagefolder", tmp_path / "nowhere", "--out", tmp_path / "settings.beton"))
    assert f"{settings} already exists; pass --overwrite" in line
    assert settings.read_text() == '{"keep": true}\n' and not (tmp_path / "settings.beton").exists()

    result = cli("prepare", "demo", "--out", out, "--images-per-class", 4, "--size", 32, "--seed", 1, "--workers", 1, "--overwrite")
    assert result.exit_code == 0, result.output
    assert open_dataset(out).meta["source"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.beton", "demo.json", "settings.json"]


_KILL_AFTER_BETON_RENAME = """
import os, signal, sys
real = os.replace
def replace(src, dst):
    real(src, dst)
    if str(dst).endswith(".beton"):
        os.kill(os.getpid(), signal.SIGKILL)  # killed between placing the .beton and its sidecar
os.replace = replace
from fastprompt.data import write_demo
write_demo(sys.argv[1], images_per_class=4, image_size=32, seed=1, workers=1, overwrite=True)
"""


def test_killed_replacement_never_pairs_new_beton_with_old_sidecar(tmp_path, small_demo):
    out = tmp_path / "demo.beton"
    out.write_bytes(small_demo.read_bytes())
    out.with_suffix(".json").write_bytes(small_demo.with_suffix(".json").read_bytes())
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_BETON_RENAME, str(out)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert out.exists() and not out.with_suffix(".json").exists()  # the old sidecar went first
    with pytest.raises(FastpromptError, match="has no sidecar demo.json"):
        open_dataset(out)


# ----------------------------------------------------------------------------------------
# damaged files: checked on open (tables), by `fastprompt verify` (checksum)


def _damaged_copy(src: Path, folder: Path, offset: int, data: bytes) -> Path:
    folder.mkdir()
    out = folder / src.name
    out.write_bytes(src.read_bytes())
    out.with_suffix(".json").write_bytes(src.with_suffix(".json").read_bytes())
    with open(out, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return out


def test_verify_finds_bytes_changed_in_the_image_data(tmp_path, small_demo):
    from ffcv.reader import Reader

    result = cli("verify", small_demo)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"OK {small_demo}: 40 images, 10 classes (train 20, val 10, test 10); sha256 checksum matches"

    table = np.sort(Reader(str(small_demo)).alloc_table, order="sample_id")
    ptr, size = int(table["ptr"][7]), int(table["size"][7])
    noise = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    damaged = _damaged_copy(small_demo, tmp_path / "noise", ptr + size // 2, noise)  # inside image 7's JPEG
    assert open_dataset(damaged).num_samples == 40  # opening reads the tables only: the checksum is verify's
    line = error_line(cli("verify", damaged))
    assert line.startswith(f"error: {damaged} is corrupt: its sha256 checksum differs from the one its sidecar recorded")
    assert line.endswith(f"re-create it with `fastprompt prepare demo --out {damaged} --overwrite --images-per-class 4 --size 32 --seed 0`")

    meta = json.loads(small_demo.with_suffix(".json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "demo.beton").write_bytes(small_demo.read_bytes())
    (old / "demo.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "checksum"}))
    result = cli("verify", old / "demo.beton")
    assert result.exit_code == 0 and result.stdout.startswith(f"OK (not checksummed) {old / 'demo.beton'}: 40 images")
    assert "its sidecar has no checksum" in result.stdout


def test_open_checks_the_tables(tmp_path, small_demo):
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType

    reader = Reader(str(small_demo))
    records = HeaderType.itemsize + 3 * FieldDescType.itemsize  # the per-sample records start here
    itemsize = reader.metadata.dtype.itemsize
    data_ptr = records + 3 * itemsize + reader.metadata.dtype["f0"].fields["data_ptr"][1]  # image 3's data pointer
    bad_ptr = _damaged_copy(small_demo, tmp_path / "ptr", data_ptr, np.uint64(int(reader.metadata["f0"]["data_ptr"][3]) + 16).tobytes())
    with pytest.raises(FastpromptError, match=r"is corrupt \(the record of image 3 does not match its data\)"):
        open_dataset(bad_ptr)

    table_ptr = int(reader.header["alloc_table_ptr"])
    bad_id = _damaged_copy(small_demo, tmp_path / "ids", table_ptr + ALLOC_TABLE_TYPE.itemsize, np.uint64(0).tobytes())
    with pytest.raises(FastpromptError, match=r"is corrupt \(its allocation table lists 39 of 40 images\)"):
        open_dataset(bad_id)

    bad_header = _damaged_copy(small_demo, tmp_path / "header", 2, np.uint16(7).tobytes())  # num_fields
    with pytest.raises(FastpromptError, match=r"has a corrupt header \(7 fields"):
        open_dataset(bad_header)

    line = error_line(cli("verify", tmp_path / "missing.beton"))
    assert "does not exist; create it with `fastprompt prepare" in line


def test_checksum_is_of_the_whole_file(small_demo):
    import hashlib

    meta = json.loads(small_demo.with_suffix(".json").read_text())
    assert meta["checksum"] == "sha256:" + hashlib.sha256(small_demo.read_bytes()).hexdigest()
    assert meta["beton_bytes"] == small_demo.stat().st_size


# ----------------------------------------------------------------------------------------
# a read-only or full disk, a killed prepare: one line, nothing left behind (issue 21 §3, §4)


def test_read_only_output_folder_is_one_line(tmp_path, failing_writes, list_files):
    import errno

    ro = tmp_path / "ro"
    ro.mkdir()
    failing_writes(ro, errno.EROFS)
    out = ro / "sub" / "d.beton"
    line = error_line(cli("prepare", "demo", "--out", out, "--images-per-class", 4, "--size", 32, "--workers", 1))
    assert line == f"error: cannot write to --out {out} (Read-only file system); pick a writable directory"
    assert list_files(ro) == []  # not even the folder it would have made


def test_full_disk_while_writing_is_one_line(tmp_path, monkeypatch, list_files):
    """The disk fills after the image data is written (the sidecar's temporary file): one line
    naming the path, the temporary .beton, the lock and the new folder removed."""
    import errno
    import tempfile

    import fastprompt.data.beton as beton

    real = tempfile.mkstemp

    def mkstemp(*args, suffix=None, **kwargs):
        if suffix == ".json.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(kwargs["dir"]))
        return real(*args, suffix=suffix, **kwargs)

    monkeypatch.setattr(beton.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "new" / "d.beton"
    line = error_line(cli("prepare", "demo", "--out", out, "--images-per-class", 4, "--size", 32, "--workers", 1))
    assert line == (f"error: cannot write {out} ({out.parent}): No space left on device; nothing was kept: free space on "
                    "that disk, or choose another --out")
    assert list_files(tmp_path) == []


@pytest.mark.slow
def test_demo_clip_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """`prepare demo-clip` writes its checkpoint at the end: a full disk there is one line naming it
    (the QUICK pretraining of tests/training/test_pretrain.py, through the command line)."""
    import errno
    import functools

    import torch

    import fastprompt.training.pretrain as pretrain

    def full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pretrain, "PretrainConfig", functools.partial(pretrain.PretrainConfig, warmup_steps=1, batch_size=8,
                                                                       images_per_concept=2))
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "clip.pt"
    line = error_line(cli("prepare", "demo-clip", "--out", out, "--steps", 3))
    assert line == (f"error: cannot write {out} (No space left on device); free space on that disk or choose another --out, "
                    "and run `fastprompt prepare demo-clip` again")
    assert list(tmp_path.iterdir()) == []


def test_an_output_another_prepare_is_writing_is_left_alone(tmp_path):
    """The lock beside the output says a live writer (or a writer process it left) still works on it:
    a second prepare of that output stops, its temporary file untouched."""
    import fcntl

    out = tmp_path / "d.beton"
    working = tmp_path / ".d.k2x9q_0a.beton.tmp"  # the other writer's temporary file
    working.write_bytes(b"being written")
    with open(tmp_path / ".d.beton.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        line = error_line(cli("prepare", "demo", "--out", out, "--images-per-class", 4, "--size", 32, "--workers", 1))
    assert line == (f"error: another process is writing {out} (pid 4242 holds {tmp_path / '.d.beton.lock'}); wait for it to "
                    "end, or use another --out")
    assert working.read_bytes() == b"being written" and not out.exists()


def _children(pid: int) -> set[int]:
    """The processes `pid` started (Linux /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed writer is reaped by PID 1, which a container may not do)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_killed_prepare_leaves_no_writer_and_a_rerun_no_temporary_file(tmp_path, list_files):
    """SIGKILL of `prepare demo --workers 2` while its writer processes run: they die with it (they
    used to block for ever, re-parented to PID 1, holding the temporary .beton and FFCV's shared
    memory), and a rerun removes the temporary files of that output before writing it."""
    import time

    out = tmp_path / "d.beton"
    neighbour = tmp_path / ".d.x.abcdefgh.beton.tmp"  # output d.x.beton's temporary name pattern: not d.beton's
    neighbour.write_bytes(b"")
    fastprompt = str(Path(sys.executable).parent / "fastprompt")
    proc = subprocess.Popen([fastprompt, "prepare", "demo", "--out", str(out), "--images-per-class", "300", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        writers: set[int] = set()
        while len(writers) < 2:  # the two writer processes (and the resource tracker) started
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before its writers started"
            writers = {p for p in _children(proc.pid) if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text()}
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".beton.tmp") and p != neighbour]
    assert left, "the kill came after the write"
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in writers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in writers), "a writer process outlived its parent"

    result = cli("prepare", "demo", "--out", out, "--images-per-class", 4, "--size", 32, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert list_files(tmp_path) == [neighbour.name, "d.beton", "d.json"]
