import pytest

from framework.config import ScheduleConfig
from framework.schedule import wsd_lr


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
