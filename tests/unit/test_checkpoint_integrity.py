"""Checkpoints damaged without changing any size, as a bad disk leaves them: found at resume (the
previous intact one used), refused when named exactly, and named by ``llada checkpoint verify``."""

import json

import pytest

from framework.checkpoint.checkpointer import read_meta
from framework.checkpoint.files import tag_for
from framework.checkpoint.integrity import (META_CHECKSUM, hash_file, meta_bytes, meta_problem,
                                            share)
from framework.config import ConfigError
from framework.launch.cli import main
from tests.unit.test_checkpoint import make_trainer

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def flip(path, nbytes: int) -> None:
    """``nbytes`` inverted in the middle of the file; its size stays."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - nbytes // 2
    data[mid:mid + nbytes] = bytes(b ^ 0xFF for b in data[mid:mid + nbytes])
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def verify(capsys, path):
    code = main(["checkpoint", "verify", str(path)])
    return code, capsys.readouterr().out


def test_same_size_damage_is_found_and_the_previous_checkpoint_used(world, tmp_path,
                                                                     small_dataset, capsys):
    make_trainer(tmp_path, small_dataset, 6, "checkpoint.interval=2", "checkpoint.keep=3").fit()
    root = tmp_path / "checkpoints"
    meta = read_meta(root / tag_for(6))
    # every file carries the checksum its writer computed, and it is the file's
    assert meta["checksums"]["algorithm"] == "xxh3_128"
    assert set(meta["checksums"]["files"]) == set(meta["files"])
    assert all(hash_file(root / tag_for(6) / rel) == h
               for rel, h in meta["checksums"]["files"].items())
    assert (root / tag_for(4) / OPTIM).stat().st_size > 3 * 4096
    flip(root / tag_for(6) / MODEL, 256)
    flip(root / tag_for(4) / OPTIM, 4096)
    capsys.readouterr()

    code, out = verify(capsys, tmp_path)  # the run directory: every checkpoint under it
    assert code == 1
    lines = {line.split(": ")[1].rsplit("/", 1)[-1]: line for line in out.splitlines()
             if line.startswith("llada: /")}
    assert "ok (" in lines[tag_for(2)] and "content checksums match" in lines[tag_for(2)]
    assert f"DAMAGED: {MODEL}: content differs" in lines[tag_for(6)]
    assert f"DAMAGED: {OPTIM}: content differs" in lines[tag_for(4)]
    assert "2 of 3 checkpoint(s) incomplete or damaged" in out
    assert verify(capsys, root / tag_for(2))[0] == 0

    # named exactly, a damaged checkpoint is an error naming the file (the CLI's exit 2)
    with pytest.raises(ConfigError, match=f"{tag_for(6)} is damaged: {MODEL}: content differs"):
        make_trainer(tmp_path, small_dataset, 8, f"checkpoint.resume={root / tag_for(6)}")
    capsys.readouterr()
    # auto: each damaged one named in a warning and passed over; the intact one before is used
    trainer = make_trainer(tmp_path, small_dataset, 8, "checkpoint.interval=2",
                           "checkpoint.keep=3")
    out = capsys.readouterr().out
    assert f"{tag_for(6)} is damaged ({MODEL}: content differs" in out
    assert f"{tag_for(4)} is damaged ({OPTIM}: content differs" in out
    assert trainer.resume.path == root / tag_for(2) and not trainer.resume.rollback
    assert sorted(p.name for p in root.glob("*.abandoned")) == [
        f"{tag_for(4)}.abandoned", f"{tag_for(6)}.abandoned"]
    summary = trainer.fit()
    assert summary["status"] == "completed" and summary["steps"] == 6


def test_a_damaged_meta_json_is_caught_by_its_own_checksum():
    meta = {"format": 1, "step": 500, "consumed_tokens": 123456, "files": {"a": 1}}
    text = meta_bytes(meta)
    assert meta_problem(json.loads(text)) is None and META_CHECKSUM in json.loads(text)
    damaged = json.loads(text.replace(b"123456", b"123457"))  # one digit, same size
    assert meta_problem(damaged) == "meta.json: its content differs from its checksum (damaged)"
    assert meta_problem(meta) is None  # written before checksums: nothing to compare


def test_every_file_is_verified_once_over_the_world():
    meta = {"files": {f"f{i}": size for i, size in enumerate([90, 10, 50, 50, 5, 5, 70])}}
    shares = [share(meta, r, 3) for r in range(3)]
    assert sorted(f for s in shares for f in s) == sorted(meta["files"])
    loads = [sum(meta["files"][f] for f in s) for s in shares]
    assert max(loads) - min(loads) <= 30  # spread by bytes, not by count
    assert share(meta, 0, 1) == sorted(meta["files"], key=lambda f: (-meta["files"][f], f))


def test_a_loaded_optimizer_state_is_copied_out_of_the_mapped_file(tmp_path):
    """The load maps the checkpoint's files; state torch's optimizer would keep as loaded (same
    device and dtype) must not stay backed by them (retention deletes them)."""
    from types import SimpleNamespace

    import torch

    from framework.checkpoint.integrity import detach_from_files

    moments = torch.arange(1000.0)
    torch.save({"exp_avg": moments}, tmp_path / "optim.pt")
    mapped = torch.load(tmp_path / "optim.pt", mmap=True)["exp_avg"]
    optimizer = SimpleNamespace(state={0: {"exp_avg": mapped, "step": 3}})
    detach_from_files(SimpleNamespace(optimizer=optimizer))
    got = optimizer.state[0]["exp_avg"]
    assert torch.equal(got, moments) and optimizer.state[0]["step"] == 3
    assert got.untyped_storage().data_ptr() != mapped.untyped_storage().data_ptr()
