"""runtime/staging.py: an output appears whole or not at all, is never replaced without force (also when two
commands race for one new name), never replaces the command's own input, and leaves no temporary names behind
(failures, SIGINT/SIGTERM/SIGHUP, and a SIGKILLed run's leftovers removed by the next run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bigcode_deploy.runtime import staging as staging_module
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.staging import refuse_existing, staged_dir, temp_name

REPO = Path(__file__).resolve().parents[2]


def beside(path: Path) -> list[str]:
    """Every name in path's directory other than path itself (temporary leftovers, say)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def write_bundle(staging: Path, text: str) -> None:
    (staging / "manifest.json").write_text(text)


def race(out: Path, count: int, force: bool) -> tuple[list[str], list[BaseException]]:
    """`count` threads stage a bundle for the same new name; all pass the early check before any publishes."""
    barrier = threading.Barrier(count)
    winners, errors = [], []

    def run(i: int) -> None:
        try:
            with staged_dir(out, force) as staging:
                write_bundle(staging, f"writer {i}")
                barrier.wait(timeout=30)
            winners.append(f"writer {i}")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners, errors


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "mkdir-claim"])
def test_racing_for_one_new_name_one_wins_the_others_fail_in_one_line(tmp_path, monkeypatch, fallback):
    if fallback:  # a platform or file system without renameat2: the mkdir claim
        monkeypatch.setattr(staging_module, "_RENAMEAT2", None)
    out = tmp_path / "bundle"
    winners, errors = race(out, 4, force=False)
    assert len(winners) == 1, (winners, errors)
    assert len(errors) == 3 and all(isinstance(e, BigCodeError) for e in errors), errors
    assert all("already exists" in str(e) and "\n" not in str(e) for e in errors)
    assert (out / "manifest.json").read_text() == winners[0]  # the winner's bundle, not replaced by a loser
    assert beside(out) == []  # the losers' staging directories are gone


RACER = """
import sys, time
from pathlib import Path
from bigcode_deploy.runtime.errors import BigCodeError
from bigcode_deploy.runtime.staging import staged_dir
out, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
try:
    with staged_dir(out, False) as staging:
        (staging / "manifest.json").write_text(name)
        print("staged", flush=True)
        while not go.exists():
            time.sleep(0.01)
except BigCodeError as exc:
    print(f"error: {exc}", flush=True)
    sys.exit(2)
print(f"wrote {out}", flush=True)
"""


def test_two_processes_racing_for_one_new_name(tmp_path):
    out, go = tmp_path / "race" / "bundle", tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(out), str(go), name], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for name in ("first", "second")
    ]
    for racer in racers:  # both passed the early check and staged their bundle
        assert racer.stdout.readline().strip() == "staged"
    go.touch()
    results = []
    for racer, name in zip(racers, ("first", "second")):
        racer.wait(timeout=60)
        results.append((racer.returncode, name, racer.stdout.read().strip()))
        racer.stdout.close()
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0][0] == 2 and "already exists" in losers[0][2] and len(losers[0][2].splitlines()) == 1
    assert (out / "manifest.json").read_text() == winners[0][1]
    assert beside(out) == []


def test_racing_with_force_each_replaces_whole(tmp_path):
    out = tmp_path / "bundle"
    winners, errors = race(out, 4, force=True)
    assert errors == [] and len(winners) == 4
    assert (out / "manifest.json").read_text() in winners
    assert beside(out) == []


def test_force_replacement_is_never_missing_or_mixed_for_a_reader(tmp_path):
    out = tmp_path / "bundle"
    with staged_dir(out, False) as staging:
        write_bundle(staging, "v0")
        (staging / "model.onnx").write_text("v0")
    stop, seen = threading.Event(), []

    def read(directory: int, name: str) -> str:
        fd = os.open(name, os.O_RDONLY, dir_fd=directory)
        with os.fdopen(fd) as f:
            return f.read()

    def reader() -> None:  # opens OUT_DIR once, then reads its files, as a loader does
        while not stop.is_set():
            try:
                directory = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                seen.append("missing")
                continue
            try:
                manifest, graph = read(directory, "manifest.json"), read(directory, "model.onnx")
            except FileNotFoundError:  # the old directory was removed after being replaced: open it again
                continue
            finally:
                os.close(directory)
            if manifest != graph:
                seen.append(f"mixed {manifest} {graph}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 200):
            with staged_dir(out, True) as staging:
                write_bundle(staging, f"v{i}")
                (staging / "model.onnx").write_text(f"v{i}")
    finally:
        stop.set()
        thread.join()
    assert (out / "manifest.json").read_text() == "v199"
    assert "missing" not in seen and not [s for s in seen if s.startswith("mixed")], seen[:5]
    assert beside(out) == []


def test_force_over_a_file_or_a_symlink_replaces_it_and_leaves_nothing(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    links = tmp_path / "links"
    links.mkdir()
    for name, make in [
        ("file", lambda p: p.write_text("a file")),
        ("symlink", lambda p: p.symlink_to(target)),
        ("dangling", lambda p: p.symlink_to(tmp_path / "nowhere")),
    ]:
        out = links / name
        make(out)
        with pytest.raises(BigCodeError, match="already exists"):
            refuse_existing(out, force=False)
        with staged_dir(out, True) as staging:
            write_bundle(staging, name)
        assert out.is_dir() and not out.is_symlink() and (out / "manifest.json").read_text() == name
    assert sorted(p.name for p in links.iterdir()) == ["dangling", "file", "symlink"]  # nothing else left
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]  # the symlink's target untouched


def test_force_over_a_file_without_renameat2_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(staging_module, "_RENAMEAT2", None)
    out = tmp_path / "out"
    out.write_text("a file")
    with staged_dir(out, True) as staging:
        write_bundle(staging, "new")
    assert (out / "manifest.json").read_text() == "new" and beside(out) == []


def test_output_that_is_or_contains_the_input_is_refused(tmp_path):
    checkpoint = tmp_path / "models" / "ckpt"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(checkpoint)
    for out in (checkpoint, tmp_path / "models", tmp_path, link, tmp_path / "models" / ".." / "models" / "ckpt"):
        with pytest.raises(BigCodeError, match="own input") as info:
            with staged_dir(out, True, inputs=[checkpoint]) as staging:
                write_bundle(staging, "bundle")
        assert "\n" not in str(info.value)
    assert (checkpoint / "config.json").read_text() == "{}"
    with staged_dir(tmp_path / "models" / "bundle", True, inputs=[checkpoint]) as staging:  # a sibling is fine
        write_bundle(staging, "bundle")


CHILD = """
import sys, time
from pathlib import Path
from bigcode_deploy.runtime.staging import staged_dir
with staged_dir(Path(sys.argv[1]), False) as staging:
    (staging / "manifest.json").write_text("half")
    print("staged", flush=True)
    time.sleep(60)
"""


def start_child(out: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a signal meant for the child does not reach pytest
    )
    assert child.stdout.readline().strip() == "staged"
    assert len(beside(out)) == 1  # its staging directory exists
    return child


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signals_remove_the_staging_directory(tmp_path, signum):
    out = tmp_path / "bundle"
    child = start_child(out)
    child.send_signal(signum)
    assert child.wait(timeout=30) != 0
    child.stdout.close()
    assert not out.exists() and beside(out) == []


def test_a_killed_runs_staging_is_removed_by_the_next_run_beside_it(tmp_path):
    out = tmp_path / "bundle"
    child = start_child(out)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    leftover = beside(out)
    assert len(leftover) == 1 and str(child.pid) in leftover[0]  # the owner's pid is in the name
    live = temp_name(tmp_path / "other", "partial")  # a live run's (this process's) staging is kept
    live.mkdir()
    with staged_dir(tmp_path / "next", False) as staging:
        write_bundle(staging, "next")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["next", live.name])
    assert str(os.getpid()) in live.name


def test_force_never_replaces_a_directory_that_is_not_a_bundle(tmp_path):
    from bigcode_deploy.runtime.staging import refuse_existing

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "thesis.txt").write_text("years of work")
    with pytest.raises(BigCodeError, match="not a bundle .no manifest.json.: --force replaces bundles only"):
        refuse_existing(docs, force=True)
    (tmp_path / "empty").mkdir()
    refuse_existing(tmp_path / "empty", force=True)  # an empty directory holds nothing to lose
