"""Checkpoints in-process on a tiny model: retention, skipping incomplete or corrupt checkpoints,
resume choices and refusals, saving on request."""

import json

import pytest

from framework.checkpoint.checkpointer import complete_checkpoints, resume_candidates, to_keep
from framework.checkpoint.files import step_of, tag_for
from framework.config import ConfigError, load_config
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE, quick_overrides


def make_trainer(run_dir, dataset, steps, *extra):
    return build_trainer(load_config(DEBUG_RECIPE, quick_overrides(run_dir, dataset, steps) +
                               ["tracking.log_interval=1", *extra]))


def saved_steps(run_dir):
    steps = [step_of(p) for p in (run_dir / "checkpoints").glob("step_*")]
    return sorted(s for s in steps if s is not None)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_retention_rule():
    assert to_keep(list(range(1, 11)), keep=3, keep_every=4) == {4, 8, 9, 10}
    assert to_keep([5, 10, 15], keep=2, keep_every=0) == {10, 15}
    assert to_keep([3], keep=2, keep_every=7) == {3}


def test_retention_across_ten_saves(world, tmp_path, small_dataset):
    make_trainer(tmp_path, small_dataset, 10, "checkpoint.interval=1", "checkpoint.keep=3",
                 "checkpoint.keep_every=4").fit()
    assert saved_steps(tmp_path) == [4, 8, 9, 10]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == tag_for(10)
    assert [s for s, _ in complete_checkpoints(root, warn=pytest.fail)] == [4, 8, 9, 10]
    assert not list(root.glob("*.tmp"))


def test_incomplete_and_corrupt_checkpoints_are_skipped(world, tmp_path, small_dataset, capsys):
    make_trainer(tmp_path, small_dataset, 9, "checkpoint.interval=3", "checkpoint.keep=3").fit()
    root = tmp_path / "checkpoints"
    # the newest loses one optimizer shard, the one before gets a truncated meta.json, and a save
    # that died half-way leaves a .tmp directory: none of them may be chosen
    (root / tag_for(9) / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    meta = root / tag_for(6) / "meta.json"
    meta.write_bytes(meta.read_bytes()[:100])
    (root / f"{tag_for(12)}.tmp").mkdir()
    (root / f"{tag_for(12)}.tmp" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a crash cut the last record short
        f.write('{"step": 9, "lo')
    capsys.readouterr()

    trainer = make_trainer(tmp_path, small_dataset, 12, "checkpoint.interval=3",
                           "checkpoint.keep=3")
    out = capsys.readouterr().out
    assert trainer.step == 3 and trainer.resume.path == root / tag_for(3)
    assert not trainer.resume.rollback  # the newer ones were not complete
    assert f"{tag_for(9)} is incomplete or corrupt (zero_pp_rank_0_mp_rank_00_optim_states.pt " \
           "missing)" in out
    assert f"{tag_for(6)} is incomplete or corrupt (meta.json unreadable" in out
    assert "1 unreadable line(s) dropped" in out
    # abandoned, never deleted: a later auto resume cannot pick them, a person still can
    assert sorted(p.name for p in root.glob("*.abandoned")) == [
        f"{tag_for(6)}.abandoned", f"{tag_for(9)}.abandoned"]
    summary = trainer.fit()
    assert summary["status"] == "completed" and summary["final_step"] == 12
    assert summary["steps"] == 9  # this session ran steps 4..12
    assert saved_steps(tmp_path) == [6, 9, 12]  # saved anew; the .tmp was cleared
    assert not list(root.glob("*.tmp"))
    # each step logged once: the killed job's records of steps 4..9 stay (the first record of a
    # step wins), the re-run adds 10..12
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 13))


def test_rollback_to_an_earlier_checkpoint(world, tmp_path, small_dataset, capsys):
    make_trainer(tmp_path, small_dataset, 6, "checkpoint.interval=2", "checkpoint.keep=5").fit()
    first = records(tmp_path)
    root = tmp_path / "checkpoints"
    trainer = make_trainer(tmp_path, small_dataset, 6, "checkpoint.interval=2",
                           "checkpoint.keep=5", f"checkpoint.resume={root / tag_for(2)}")
    out = capsys.readouterr().out
    assert "moved aside" in out and trainer.resume.rollback
    assert "4 records of" in out and "after step 2 moved to metrics-set-aside-" in out
    (aside,) = tmp_path.glob("metrics-set-aside-*.jsonl")
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [3, 4, 5, 6]
    assert saved_steps(tmp_path) == [2]
    trainer.fit()
    assert saved_steps(tmp_path) == [2, 4, 6]
    again = records(tmp_path)  # the same run again, from step 3 on
    assert [r["step"] for r in again] == list(range(1, 7))
    assert [r["train/loss"] for r in again] == [r["train/loss"] for r in first]


def test_auto_never_starts_over_checkpoints_that_all_fail(world, tmp_path, small_dataset):
    make_trainer(tmp_path, small_dataset, 2, "checkpoint.interval=1").fit()
    for step in (1, 2):
        (tmp_path / "checkpoints" / tag_for(step) / "rng" / "rank_00000.pt").unlink()
    with pytest.raises(ConfigError, match="none of the 2 checkpoints under .* is complete"):
        make_trainer(tmp_path, small_dataset, 4)
    with pytest.raises(ConfigError, match="checkpoint.resume=never, but"):
        make_trainer(tmp_path, small_dataset, 4, "checkpoint.resume=never")


def test_resume_choices_and_refusals(world, tmp_path, small_dataset):
    make_trainer(tmp_path, small_dataset, 2, "checkpoint.interval=1").fit()
    root = tmp_path / "checkpoints"
    with pytest.raises(ConfigError, match="checkpoint.resume=never, but .* holds checkpoints"):
        resume_candidates("never", root, warn=print)
    # an explicit path is used as given, never silently replaced by another
    assert resume_candidates(str(root / tag_for(1)), root, warn=print) == ([root / tag_for(1)],
                                                                           True)
    (root / tag_for(1) / "meta.json").unlink()
    with pytest.raises(ConfigError, match=f"{tag_for(1)} cannot be used \\(no meta.json\\)"):
        resume_candidates(str(root / tag_for(1)), root, warn=print)
    with pytest.raises(ConfigError, match="model.hidden_size=128, the config has 64"):
        make_trainer(tmp_path, small_dataset, 4, "model.hidden_size=64")
    with pytest.raises(ConfigError, match="train.global_batch_size=16, the config has 32"):
        make_trainer(tmp_path, small_dataset, 4, "train.global_batch_size=32")


def test_checkpoint_on_request(world, tmp_path, small_dataset):
    trainer = make_trainer(tmp_path, small_dataset, 5, "objective.variable_length_prob=0.5")
    first = trainer.train_step()
    trainer.maybe_checkpoint(final=False)
    assert saved_steps(tmp_path) == []  # no interval, not the end, not requested
    trainer.checkpoints.request()  # a save on request, the run goes on
    second = trainer.train_step()
    trainer.maybe_checkpoint(final=False)
    assert saved_steps(tmp_path) == [2]
    meta = json.loads((tmp_path / "checkpoints" / tag_for(2) / "meta.json").read_text())
    assert meta["step"] == 2 and meta["consumed_samples"] == 2 * 16
    assert meta["consumed_tokens"] == first.tokens + second.tokens
    assert meta["layout"]["world_size"] == 1 and meta["config"]["train"]["steps"] == 5
    trainer.train_step()
    trainer.maybe_checkpoint(final=False)
    assert saved_steps(tmp_path) == [2]  # the request was served once


def test_checkpoint_by_wall_time(world, tmp_path, small_dataset):
    # a microsecond interval: due after every step, by rank 0's clock
    make_trainer(tmp_path, small_dataset, 3, "checkpoint.interval_minutes=1e-8",
                 "checkpoint.keep=5").fit()
    assert saved_steps(tmp_path) == [1, 2, 3]


def test_a_fresh_start_in_an_old_run_dir_logs_each_step_once(world, tmp_path, small_dataset):
    for _ in range(2):  # no checkpoints: the second run starts over, and so does its record
        make_trainer(tmp_path, small_dataset, 3).fit()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    (aside,) = tmp_path.glob("metrics-set-aside-*.jsonl")  # the first run's, kept
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [1, 2, 3]


def test_a_rollback_whose_start_fails_is_still_a_rollback_on_the_next(world, tmp_path,
                                                                      small_dataset, monkeypatch):
    """The newer checkpoints are set aside before the metrics stream and MLflow act on the
    rollback; a start that fails in between leaves the decision on disk for the next one."""
    import framework.checkpoint.manager as manager
    make_trainer(tmp_path, small_dataset, 4, "checkpoint.interval=2", "checkpoint.keep=5").fit()
    back = f"checkpoint.resume={tmp_path / 'checkpoints' / tag_for(2)}"

    def fail(*args, **kwargs):
        raise ConfigError("checkpoint.resume: refused (a test)")
    with monkeypatch.context() as m:
        m.setattr(manager, "load_checkpoint", fail)
        with pytest.raises(ConfigError, match="a test"):
            make_trainer(tmp_path, small_dataset, 4, back)
    assert saved_steps(tmp_path) == [2]  # step 4 is already aside
    trainer = make_trainer(tmp_path, small_dataset, 4, back, "checkpoint.interval=2")
    assert trainer.resume.rollback and not (tmp_path / "checkpoints" / "rollback.json").exists()
    assert [r["step"] for r in records(tmp_path)] == [1, 2]  # 3 and 4 set aside
    trainer.fit()
    again = make_trainer(tmp_path, small_dataset, 6, "checkpoint.interval=2")
    assert again.resume.step == 4 and not again.resume.rollback  # an ordinary resume now


def test_an_async_save_holds_the_state_of_its_step_while_training_goes_on(world, tmp_path,
                                                                         small_dataset,
                                                                         monkeypatch):
    """checkpoint.async_save: the save returns once the state is copied; its files, written
    while two more steps change every weight (held back 1 s), hold the weights of its step,
    and verify; ``latest`` names it only once it is complete."""
    import torch

    from framework.checkpoint.checkpointer import verify_checkpoint

    monkeypatch.setenv("LLADA_FAULTS", "save_delay=2:1")
    trainer = make_trainer(tmp_path, small_dataset, 10, "checkpoint.async_save=true",
                           "deepspeed.zero_stage=1")
    for _ in range(2):
        trainer.train_step()
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()
               if torch.is_tensor(v)}
    path = trainer.save_checkpoint()
    assert not path.exists() and not (tmp_path / "checkpoints" / "latest").exists()
    trainer.train_step()
    trainer.train_step()
    trainer.checkpoints.wait()
    assert (tmp_path / "checkpoints" / "latest").read_text() == tag_for(2)
    assert verify_checkpoint(path) == []
    saved = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    now = trainer.engine.module.state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)
    assert any(not torch.equal(now[k], weights[k]) for k in weights)  # the training went on
    (step, done, seconds), = trainer.checkpoints.completed
    assert (step, done) == (2, path) and seconds >= 1.0
    trainer.data.close()
