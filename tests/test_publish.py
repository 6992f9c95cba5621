"""Publishing (lors.fsutil): a kill at any step leaves the complete old or the complete new
output, a SIGKILLed run's temporary is removed by the next run, and SIGTERM is a clean exit."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny_speech
from lors import fsutil
from lors.errors import OutputExistsError

OLD = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW = {"a.txt": "new a", "c.txt": "new c", "sub/d/e.txt": "new e"}
THIRD = {"z.txt": "third"}

# Runs one publish of NEW over OLD and SIGKILLs itself at event KILL_AT, where the events are
# the moments before and after every file-system call the publish makes and after every file
# it writes; with KILL_AT past the last event it finishes.
CHILD = r'''
import json, os, signal, sys
from pathlib import Path
from lors import fsutil

kind, folder, kill_at, new = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
events = 0

def point():
    global events
    if events == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    events += 1

def traced(call):
    def run(*args, **kwargs):
        point()
        result = call(*args, **kwargs)
        point()
        return result
    return run

for name in ("replace", "rename", "mkdir", "open", "unlink", "rmdir", "fsync"):
    setattr(os, name, traced(getattr(os, name)))
fsutil._exchange = traced(fsutil._exchange)
out = folder / "out"
if kind == "directory":
    with fsutil.atomic_directory(out, force=True) as tmp:
        for rel, text in new.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
            point()
elif kind == "file":
    with fsutil.atomic_file(out, "w") as handle:
        for text in new.values():
            handle.write(text)
            handle.flush()
            point()
else:
    fsutil.publish(folder / "built", out, force=True)
'''


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def tree(root: Path) -> dict[str, str] | None:
    """The files under ``root`` (relative path -> text), or None when ``root`` is missing."""
    if not root.is_dir():
        return None
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def snapshot(out: Path, kind: str):
    if kind == "file":
        return out.read_text() if out.is_file() else None
    return tree(out)


def failing_exchange(a, b) -> bool:
    raise OSError(errno.EIO, "simulated")


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("kind", ["directory", "file", "publish"])
def test_a_kill_at_any_step_leaves_old_or_new_and_the_next_run_cleans_up(kind, tmp_path):
    old = "".join(OLD.values()) if kind == "file" else OLD
    new = "".join(NEW.values()) if kind == "file" else NEW
    seen, kill_at = [], 0
    while True:
        folder = tmp_path / f"kill-{kill_at}"
        folder.mkdir()
        if kind == "file":
            (folder / "out").write_text(old)
        else:
            write_tree(folder / "out", OLD)
        if kind == "publish":
            write_tree(folder / "built", NEW)
        child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(folder), str(kill_at),
                                  json.dumps(NEW)], stderr=subprocess.PIPE, text=True)
        _, err = child.communicate(timeout=120)
        assert child.returncode in (0, -signal.SIGKILL), err
        state = snapshot(folder / "out", kind)
        assert state in (old, new), (kill_at, state)
        others = sorted(p.name for p in folder.iterdir() if p.name != "out")
        if "built" in others:  # killed before the move: the finished work is intact
            assert kind == "publish" and tree(folder / "built") == NEW
            others.remove("built")
        temporary = re.compile(rf"\.out\.tmp-{child.pid}@\w+-[0-9a-f]{{8}}")
        assert all(temporary.fullmatch(name) for name in others), (kill_at, others)
        seen.append((state == new, bool(others)))
        if child.returncode == 0:
            assert state == new and not others
            break
        # The next run (this process, which has not listed the folder yet) publishes again.
        if kind == "file":
            with fsutil.atomic_file(folder / "out", "w") as handle:
                handle.write("third")
            assert (folder / "out").read_text() == "third"
        else:
            with fsutil.atomic_directory(folder / "out", force=True) as tmp:
                write_tree(tmp, THIRD)
            assert tree(folder / "out") == THIRD
        assert sorted(p.name for p in folder.iterdir() if p.name != "built") == ["out"]
        kill_at += 1
    assert kill_at > 10  # every step was reached
    # killed before and after the switch, with a temporary left before it (and, for a
    # folder, after it: the temporary then holds the old one)
    assert {s for s, _ in seen} == {False, True}
    assert (False, True) in seen and (kind == "file" or (True, True) in seen)


def test_a_publish_removes_only_dead_owners_temporaries_of_that_output(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    removed = [f".out.tmp-{dead}-0123abcd", f".out.tmp-{dead}-ffffffff",
               f".out.tmp-{dead}@{fsutil._HOST}-0123abcd"]
    kept = [f".out.tmp-{alive}-0123abcd",   # its owner (this process) is alive
            f".out.tmp-{dead}@otherhost-0123abcd",  # another machine's pid: unknowable here
            f".out.tmp-{dead}-0123abc",     # not exactly our pattern
            f".out.tmp-{dead}-0123abcd.x", f"out.tmp-{dead}-0123abcd", ".out.tmp--0123abcd",
            f".other.tmp-{dead}-0123abcd",  # another output's
            f".out.x.tmp-{dead}-0123abcd"]
    for name in removed[:1] + removed[2:] + kept:
        write_tree(tmp_path / name, {"model.bin": "x" * 100})
    (tmp_path / removed[1]).write_text("a file temporary")
    with fsutil.atomic_directory(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out"])
    assert tree(tmp_path / "out") == {"new.txt": "new"}


def test_file_temporaries_of_dead_owners_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".x.wav.tmp-{dead_pid()}-89abcdef"
    stale.write_bytes(b"partial")
    with fsutil.atomic_file(tmp_path / "x.wav", "wb") as handle:
        handle.write(b"RIFF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]


def test_without_rename_exchange_two_renames_still_replace_or_restore(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "_renameat2", lambda: None)
    out = tmp_path / "out"
    write_tree(out, OLD)
    with fsutil.atomic_directory(out, force=True) as tmp:
        write_tree(tmp, NEW)
    assert tree(out) == NEW and [p.name for p in tmp_path.iterdir()] == ["out"]
    original, calls = os.replace, []

    def failing(src, dst):  # the new one cannot be moved in: the old one is put back
        calls.append(dst)
        if Path(dst) == out and calls.count(dst) == 1:
            raise OSError(errno.EIO, "simulated")
        return original(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="simulated"):
        with fsutil.atomic_directory(out, force=True) as tmp:
            write_tree(tmp, THIRD)
    assert tree(out) == NEW and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_publish_refuses_an_existing_output_and_puts_back_what_it_could_not_publish(
        tmp_path, monkeypatch):
    built, out = tmp_path / "built", tmp_path / "out"
    write_tree(built, NEW)
    write_tree(out, OLD)
    with pytest.raises(OutputExistsError):
        fsutil.publish(built, out)
    monkeypatch.setattr(fsutil, "_exchange", failing_exchange)
    with pytest.raises(OSError, match="simulated"):
        fsutil.publish(built, out, force=True)
    assert tree(built) == NEW and tree(out) == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built", "out"]
    monkeypatch.undo()
    fsutil.publish(built, out, force=True)
    assert tree(out) == NEW and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigterm_raises_terminated_inside_the_block_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(fsutil.Terminated):
        with fsutil.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) == before
    assert issubclass(fsutil.Terminated, KeyboardInterrupt)


@pytest.fixture(scope="module")
def slower_tiny(tmp_path_factory) -> dict:
    """A tiny base and two experts big enough that an exact-SVD merge takes about a second."""
    from lors.tiny import save_tiny_base, save_tiny_expert
    root = tmp_path_factory.mktemp("slower")
    base = save_tiny_base(root / "base", d_model=256, encoder_layers=4, decoder_layers=4,
                          encoder_ffn_dim=1024, decoder_ffn_dim=1024)
    return {"base": base, "e0": save_tiny_expert(base, root / "e0", seed=1),
            "e1": save_tiny_expert(base, root / "e1", seed=2)}


def test_sigterm_mid_merge_exits_143_keeping_the_old_output_and_no_temporary(
        slower_tiny, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(slower_tiny["e0"], out)  # the old output, replaced only by a whole merge
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    command = [sys.executable, "-m", "lors.cli", "merge", "--base", str(slower_tiny["base"]),
               "--expert", f"a={slower_tiny['e0']}", "--expert", f"b={slower_tiny['e1']}",
               "--method", "lors", "--svd", "exact", "--out", str(out), "--force", "--quiet"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*")):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, (stdout, stderr)
    assert "lors: terminated" in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict:
    from lors.data.manifest import write_manifest
    from lors.tiny import save_tiny_base
    root = tmp_path_factory.mktemp("publish-train")
    base = save_tiny_base(root / "base", chunk_seconds=10)
    manifest = write_manifest(root / "manifest.jsonl", make_tiny_speech(root, {"train": 8, "dev": 4}))
    return {"root": root, "base": base, "manifest": manifest}


def train_config(speech, out: Path, **overrides):
    from lors.training import TrainConfig
    values = dict(base=str(speech["base"]), manifest=str(speech["manifest"]),
                  pairs=[("de", "asr")], out=str(out), max_steps=1, batch_size=4,
                  cache_dir=str(speech["root"] / "cache"), show_progress=False, cpu=True)
    return TrainConfig(**{**values, **overrides})


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("sequential", [False, True])
def test_training_with_force_keeps_the_old_output_until_the_new_one_is_in_place(
        speech, tmp_path, monkeypatch, sequential):
    from lors.training import train
    out = tmp_path / "model"
    train(train_config(speech, out))
    old = files(out)
    pairs = [("de", "asr"), ("fr", "asr")] if sequential else [("de", "asr")]
    again = train_config(speech, out, force=True, max_steps=2, pairs=pairs, sequential=sequential)

    original, seen = fsutil._exchange, []
    monkeypatch.setattr(fsutil, "_exchange", failing_exchange)
    with pytest.raises(OSError, match="simulated"):
        train(again)
    assert files(out) == old  # the failed publish left the old output whole
    built = tmp_path / "model.partial" / ("" if sequential else "model") / "training.json"
    assert built.is_file()  # and the finished work where a re-run finds it
    assert not list(tmp_path.glob(".model.tmp-*"))

    def watching(new, target):
        seen.append(files(Path(target)) == old and (Path(new) / "config.json").is_file())
        return original(new, target)
    monkeypatch.setattr(fsutil, "_exchange", watching)
    summary = train(again)
    assert seen == [True]  # the old one was whole up to the moment the new one took its place
    assert files(out) != old
    assert json.loads((out / "training.json").read_text())["samples"] == summary["samples"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
