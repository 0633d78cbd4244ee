"""Paths: every command works from any working directory (relative arguments, external data), the manifest records
the source checkpoint as an absolute path with its sha256 and every command that loads it refuses a changed or
different checkpoint, an output never replaces the command's own input, a read-only bundle still gets its verdict.

Each CLI call runs from a directory that is neither the bundle's nor the checkpoint's."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bigcode_deploy.cli import main
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.runtime.progress import quiet
from tests.helpers import make_hf_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint dir, bundle dir with external data) under one root, and an empty directory elsewhere."""
    root = tmp_path_factory.mktemp("paths")
    checkpoint = root / "models" / "ckpt"
    make_hf_model("causal-lm", seed=0).save_pretrained(checkpoint)
    bundle = export_bundle(checkpoint, root / "bundles" / "ext", external_data=True, check=False, progress=quiet)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    return checkpoint, bundle, elsewhere


def cli(*args, cwd: Path):
    """The CLI run from `cwd` (paths given relative to it where possible), restoring the working directory."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(previous)


def rel(path: Path, cwd: Path) -> str:
    return os.path.relpath(path, cwd)


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and all(f in error[0] for f in fragments), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback


def test_quantize_int8_with_external_data_from_another_directory(exported, tmp_path):
    _, bundle, elsewhere = exported
    out = tmp_path / "q8"
    args = ["--target", "ort", "--quantize", "int8"]
    result = cli("optimize", rel(bundle, elsewhere), rel(out, elsewhere), *args, cwd=elsewhere)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graph"]["external_data"] == "model.onnx.data" and manifest["quantization"]["scheme"] == "int8"
    result = cli("verify", rel(out, elsewhere), cwd=elsewhere)
    assert result.exit_code == 0 and "parity ok" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]


def test_source_is_recorded_absolute_and_torch_commands_run_from_anywhere(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_hf_model("causal-lm", seed=0).save_pretrained(work / "ckpt")
    result = cli("export", "ckpt", "b", "--no-check", cwd=work)  # relative to the working directory
    assert result.exit_code == 0, result.output
    source = json.loads((work / "b" / "manifest.json").read_text())["source"]
    assert source["model_dir"] == str((work / "ckpt").resolve()) and Path(source["model_dir"]).is_absolute()
    assert set(source["sha256"]) == {"config.json", "model.safetensors"}
    bundle = rel(work / "b", elsewhere)
    result = cli("verify", bundle, "--backend", "torch", cwd=elsewhere)
    assert result.exit_code == 0 and "parity ok" in result.output, result.output
    result = cli("generate", bundle, "--ids", "1,2,3", "--max-new-tokens", "2", "--backend", "torch", cwd=elsewhere)
    assert result.exit_code == 0, result.output
    result = cli("optimize", bundle, "fp16", "--target", "portable", "--dtype", "fp16", cwd=elsewhere)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in elsewhere.iterdir()) == ["fp16"]


@pytest.fixture
def changed_weights(exported):
    """The exported bundle's checkpoint with one weight changed (restored afterwards)."""
    checkpoint = exported[0]
    weights = checkpoint / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith("attn.c_attn.weight"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    yield checkpoint
    weights.write_bytes(original)


def test_changed_checkpoint_is_refused_by_every_command_that_loads_it(exported, changed_weights, tmp_path):
    checkpoint, bundle, elsewhere = exported
    commands = [
        ("verify", bundle, "--backend", "torch"),
        ("verify", bundle, "--model", checkpoint),
        ("verify", bundle, "--model", checkpoint, "--backend", "torch"),
        ("generate", bundle, "--ids", "1,2", "--max-new-tokens", "1", "--backend", "torch"),
        ("optimize", bundle, tmp_path / "fp16", "--target", "portable", "--dtype", "fp16"),
    ]
    for command in commands:
        result = cli(*command, cwd=elsewhere)
        one_line_error(result, "changed since the bundle was exported", "model.safetensors differs")
        assert "config.json" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_another_checkpoint_passed_as_model_is_refused(exported, tmp_path):
    _, bundle, elsewhere = exported
    other = tmp_path / "other"
    make_hf_model("causal-lm", seed=1).save_pretrained(other)
    for backend in ("ort", "torch"):
        result = cli("verify", bundle, "--model", rel(other, elsewhere), "--backend", backend, cwd=elsewhere)
        one_line_error(result, "is not the checkpoint the bundle was exported from", "model.safetensors differs")
    copy = tmp_path / "copy"  # the same files elsewhere are the same checkpoint
    shutil.copytree(exported[0], copy)
    result = cli("verify", bundle, "--model", copy, cwd=elsewhere)
    assert result.exit_code == 0 and "parity ok" in result.output, result.output


def test_an_output_that_is_or_contains_the_input_is_refused(exported, tmp_path):
    _, bundle, elsewhere = exported
    checkpoint = tmp_path / "models" / "ckpt"
    shutil.copytree(exported[0], checkpoint)
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    for out in (checkpoint, checkpoint.parent, rel(checkpoint, elsewhere)):
        result = cli("export", rel(checkpoint, elsewhere), out, "--force", "--no-check", cwd=elsewhere)
        one_line_error(result, "own input")
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == files
    bundle_files = sorted(p.name for p in bundle.iterdir())
    for out in (bundle, bundle.parent):
        result = cli("optimize", bundle, out, "--target", "portable", "--force", cwd=elsewhere)
        one_line_error(result, "own input")
        result = cli("optimize", bundle, out, "--target", "ort", "--quantize", "int8", "--force", cwd=elsewhere)
        one_line_error(result, "own input")
        result = cli("build-engine", bundle, "--lower-to", out, "--force", cwd=elsewhere)
        one_line_error(result, "own input")
    # Re-exporting reads the recorded checkpoint: the output must not replace it either (refused before any work as a
    # directory that is not a bundle; the re-export's own check would call it the command's own input).
    result = cli("optimize", bundle, exported[0], "--target", "portable", "--dtype", "fp16", "--force", cwd=elsewhere)
    one_line_error(result, "replaces bundles only")
    assert sorted(p.name for p in bundle.iterdir()) == bundle_files and exported[0].is_dir()


def test_verify_on_a_read_only_bundle_shows_its_verdict(exported, tmp_path, monkeypatch):
    _, bundle, elsewhere = exported
    read_only = tmp_path / "ro"
    shutil.copytree(bundle, read_only)
    (read_only / "parity.json").unlink(missing_ok=True)  # an earlier verify of the shared bundle wrote one
    files = sorted(p.name for p in read_only.iterdir())
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    if os.geteuid() == 0:  # root writes through the mode bits: refuse writes there as a read-only mount would
        write_text = Path.write_text

        def refusing(self, *args, **kwargs):
            if self.parent == read_only:
                raise PermissionError(13, "Permission denied", str(self))
            return write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", refusing)
    try:
        result = cli("verify", read_only, cwd=elsewhere)
    finally:
        read_only.chmod(0o755)
    assert result.exit_code == 0, result.output
    assert "parity ok" in result.stdout and "verify ort vs the stored" in result.stdout, result.stdout
    notes = [line for line in result.stderr.splitlines() if "parity.json" in line]
    assert len(notes) == 1 and "read-only" in notes[0], result.stderr
    assert not (read_only / "parity.json").exists()
    assert sorted(p.name for p in read_only.iterdir()) == files


def listing(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*"))


def test_output_paths_that_name_no_writable_directory_are_one_line(exported, tmp_path):
    _, bundle, elsewhere = exported
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [
        ([tmp_path / "a_file" / "out"], "a_file (in OUT_DIR's path) is a file, not a directory"),
        ([tmp_path / "dangling"], "already exists (a dangling symbolic link)"),
        ([tmp_path / "dangling" / "out"], "is a dangling symbolic link, not a directory"),
        (["."], "names no new directory"),
        ([".", "--force"], "names no new directory"),
        (["..", "--force"], "names no new directory"),
        (["/"], "names no new directory"),
        ([tmp_path / ("n" * 256)], "is 256 bytes long"),
        ([tmp_path / os.fsdecode(b"\xffout")], "\\xffout is not UTF-8"),  # ONNX's tools would fail half-way
    ]
    before = listing(tmp_path, elsewhere)
    for out, fragment in cases:
        result = cli("optimize", bundle, *out, "--target", "portable", "--no-check", cwd=elsewhere)
        one_line_error(result, fragment)
    assert listing(tmp_path, elsewhere) == before and (tmp_path / "dangling").is_symlink()


def test_a_name_of_255_bytes_stages_within_the_limit(exported, tmp_path):
    _, bundle, elsewhere = exported
    out = tmp_path / ("n" * 255)  # the staging name (.NAME.partial-HOST-PID-TOKEN) is shortened to fit
    result = cli("optimize", bundle, out, "--target", "portable", "--no-check", cwd=elsewhere)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_read_only_parent_is_one_line_and_leaves_nothing(exported, tmp_path, monkeypatch):
    _, bundle, elsewhere = exported
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    mkdir = Path.mkdir

    def refusing(self, *args, **kwargs):  # root writes through the mode bits: refuse as a read-only mount would
        if self.parent == read_only:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing)
    try:
        result = cli("optimize", bundle, read_only / "out", "--target", "portable", "--no-check", cwd=elsewhere)
    finally:
        read_only.chmod(0o755)
    one_line_error(result, f"cannot write in {read_only}", "Permission denied")
    assert list(read_only.iterdir()) == []


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(exported, tmp_path, monkeypatch):
    import errno

    _, bundle, elsewhere = exported
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if ".partial-" in self.parent.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "new" / "deeper" / "out"  # two parents created by this run: removed again
    result = cli("optimize", bundle, out, "--target", "portable", "--no-check", cwd=elsewhere)
    one_line_error(result, f"writing OUT_DIR {out} failed: No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_verify_where_parity_json_is_a_directory_is_one_line_and_leaves_no_temp_file(exported, tmp_path):
    _, bundle, elsewhere = exported
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "parity.json").unlink(missing_ok=True)
    (copy / "parity.json").mkdir()
    result = cli("verify", copy, cwd=elsewhere)
    one_line_error(result, "cannot write")
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".parity")) == []
