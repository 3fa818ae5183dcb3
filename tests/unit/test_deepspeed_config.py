import pytest

from framework.config import DeepSpeedConfig
from framework.training.deepspeed_config import deepspeed_json


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_json_follows_our_config(stage):
    ds = deepspeed_json(DeepSpeedConfig(zero_stage=stage), micro_batch_size=4,
                        grad_accumulation=8, data_parallel_size=16, bf16=True, grad_clip=1.0)
    assert ds["train_batch_size"] == 4 * 8 * 16
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0


def test_deepspeed_accepts_generated_json():
    from deepspeed.runtime.config import DeepSpeedConfig as DSConfig

    ds = deepspeed_json(DeepSpeedConfig(zero_stage=2), micro_batch_size=2, grad_accumulation=3,
                        data_parallel_size=1, bf16=False, grad_clip=0.5)
    parsed = DSConfig(ds)  # DeepSpeed's own validation of keys and batch sizes
    assert parsed.train_batch_size == 6 and parsed.zero_optimization_stage == 2
