import pytest

from framework.config import ScheduleConfig, load_config
from framework.training.schedule import decay_start, drop_step, schedule_warnings, wsd_lr
from tests.conftest import REPO


def test_paper_shape_warmup_stable_drop_decay():
    cfg = ScheduleConfig(warmup_steps=100, drop_at=0.5, drop_lr=1e-4, decay_fraction=0.2,
                         final_lr=1e-5)
    lrs = [wsd_lr(s, 1000, 4e-4, cfg) for s in range(1000)]
    assert lrs[0] == pytest.approx(4e-6) and lrs[99] == pytest.approx(4e-4)
    assert all(b >= a for a, b in zip(lrs[:100], lrs[1:100]))  # linear warmup
    assert set(lrs[100:500]) == {4e-4}  # stable
    assert set(lrs[500:800]) == {1e-4}  # dropped
    assert lrs[-1] == pytest.approx(1e-5)  # decayed to the end value
    assert all(b <= a for a, b in zip(lrs[800:], lrs[801:]))


def test_no_drop_decays_from_peak():
    cfg = ScheduleConfig(warmup_steps=0, drop_at=None, decay_fraction=0.5, final_lr=0.0)
    assert wsd_lr(0, 10, 1.0, cfg) == 1.0
    assert wsd_lr(5, 10, 1.0, cfg) == pytest.approx(0.8)
    assert wsd_lr(9, 10, 1.0, cfg) == pytest.approx(0.0)


TOKENS_PER_STEP = 1280 * 4096  # the paper's global batch of 4096-token sequences


@pytest.mark.parametrize("recipe", ["llada-1b.yaml", "llada-8b.yaml"])
def test_the_paper_recipes_give_its_token_budget_to_the_nearest_step(recipe):
    """2.3T tokens, the rate dropped to 1e-4 at 1.2T, a linear decay over the last 0.3T."""
    cfg = load_config(REPO / "recipes" / recipe, need_data=False)
    steps = cfg.train.steps
    assert cfg.train.global_batch_size * cfg.data.seq_len == TOKENS_PER_STEP
    assert steps == round(2.3e12 / TOKENS_PER_STEP)
    lrs = {s: wsd_lr(s, steps, cfg.optimizer.lr, cfg.schedule) for s in
           (228_880, 228_881, 228_882, 381_469, 381_470, 381_471)}
    assert drop_step(steps, cfg.schedule) == round(1.2e12 / TOKENS_PER_STEP) == 228_882
    assert lrs[228_881] == 4e-4 and lrs[228_882] == 1e-4
    assert decay_start(steps, cfg.schedule) == round(2.0e12 / TOKENS_PER_STEP) == 381_470
    assert lrs[381_469] == 1e-4 and lrs[381_470] < 1e-4
    assert wsd_lr(steps - 1, steps, cfg.optimizer.lr, cfg.schedule) == pytest.approx(1e-5)
    assert schedule_warnings(steps, cfg.schedule) == []


def test_a_warmup_into_the_decay_or_past_the_run_is_named():
    cfg = ScheduleConfig(warmup_steps=2000, drop_at=0.5, decay_fraction=0.13)
    assert schedule_warnings(100_000, cfg) == []
    (past,) = schedule_warnings(20, cfg)
    assert "schedule.warmup_steps=2000" in past and "train.steps=20" in past
    into = schedule_warnings(2200, cfg)  # drop at step 1100, decay from 1914
    assert len(into) == 2 and "schedule.drop_at" in into[0] and "schedule.decay_fraction" in into[1]
