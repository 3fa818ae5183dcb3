"""The sampler against an independent reimplementation of the release's generate, its
invariants, fast mode's exactness, and the padding mask and cache of the attention it runs on."""

import pytest
import torch

from framework.config import ConfigError
from framework.inference.sampler import SamplerConfig, commit_schedule, generate
from framework.model.attention import Attend
from tests.unit.inference_helpers import full_logits, release_generate, tiny_model


@pytest.fixture(scope="module")
def im(world, small_tokenizer):
    return tiny_model(small_tokenizer)


@pytest.fixture(scope="module")
def prompts(im):
    texts = ["def parse(self, text):", "import os", "class Handler(object):\n    "]
    return [im.document_start() + im.tokenizer.encode(t) for t in texts]


def test_commit_schedule_is_linear_with_the_remainder_first():
    assert commit_schedule(10, 4) == [3, 3, 2, 2]
    assert commit_schedule(8, 8) == [1] * 8
    assert sum(commit_schedule(37, 5)) == 37


@pytest.mark.parametrize("gen, steps, block, cfg_scale", [
    (24, 24, 24, 0.0),  # one block, one token per step
    (24, 12, 8, 0.0),  # three blocks, two tokens per step
    (24, 6, 24, 0.0),  # four per step
    (16, 8, 4, 1.5),  # blocks and classifier-free guidance
])
def test_plain_mode_equals_the_release_generate(im, prompts, gen, steps, block, cfg_scale):
    cfg = SamplerConfig(gen_length=gen, steps=steps, block_length=block, cfg_scale=cfg_scale,
                        stop_at_eos=False)
    ours = generate(im, prompts, cfg)
    for p, c in zip(prompts, ours):
        ref = release_generate(full_logits(im), torch.tensor([p]), steps, gen, block, cfg_scale,
                               im.mask_id)[0, len(p):].tolist()
        stop = next((i for i, t in enumerate(ref) if t in im.stop_ids), len(ref))
        assert c.tokens == ref[:stop]
        assert c.generated == gen and c.steps == steps


def _invariants(im, cfg, prompts):
    """Runs the sampler, checking after every step what the reverse process promises."""
    seen = {}

    def trace(x, plen, lo, hi):
        before = seen.get("x")
        masked = x == im.mask_id
        assert not masked[:, :plen].any()  # the prompt is never masked ...
        if before is not None:
            assert torch.equal(x[:, :plen], before[:, :plen])  # ... nor changed
            was = before != im.mask_id
            assert torch.equal(x[was], before[was])  # a committed token never changes
        assert masked[:, hi:].all()  # nothing after the current block is committed
        seen["x"] = x
    out = generate(im, prompts, cfg, trace=trace)
    assert not (seen["x"] == im.mask_id).any()  # no mask remains at the end
    return out


@pytest.mark.parametrize("remasking, temperature", [("low_confidence", 0.0),
                                                    ("low_confidence", 0.8),
                                                    ("random", 0.0), ("random", 1.0)])
def test_invariants_and_seeded_randomness(im, prompts, remasking, temperature):
    cfg = SamplerConfig(gen_length=16, steps=8, block_length=8, remasking=remasking,
                        temperature=temperature, stop_at_eos=False, seed=5)
    first = _invariants(im, cfg, prompts)
    assert [c.tokens for c in generate(im, prompts, cfg)] == [c.tokens for c in first]
    # a prompt's randomness is its own: the same tokens alone as in a batch
    assert generate(im, prompts[:1], cfg)[0].tokens == first[0].tokens
    if temperature > 0 or remasking == "random":
        other = generate(im, prompts, SamplerConfig(**{**cfg.__dict__, "seed": 6}))
        assert [c.tokens for c in other] != [c.tokens for c in first]


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_fast_mode_with_exactness_settings_equals_plain_mode(im, prompts, cache):
    plain = SamplerConfig(gen_length=24, steps=12, block_length=8, stop_at_eos=False,
                          cfg_scale=0.5)
    fast = SamplerConfig(**{**plain.__dict__, "cache": cache, "refresh": "step"})
    assert [c.tokens for c in generate(im, prompts, fast)] == \
        [c.tokens for c in generate(im, prompts, plain)]


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_fast_mode_with_its_speed_settings_keeps_the_invariants(im, prompts, cache):
    cfg = SamplerConfig(gen_length=24, steps=24, block_length=8, stop_at_eos=False,
                        cache=cache, threshold=0.05)
    out = _invariants(im, cfg, prompts)
    assert all(c.steps <= 24 for c in out)


def test_cached_span_logits_equal_the_full_forward(im, prompts):
    """A forward of one span reading the others' keys and values from the cache gives the full
    forward's logits there (the fast path is the training model's, only attended differently)."""
    ids, real = im.pad_left([p + [im.mask_id] * 12 for p in prompts])
    lo, hi = ids.shape[1] - 12, ids.shape[1] - 4
    select = torch.zeros_like(real)
    select[:, lo:hi] = True
    cache = {}
    full = im.logits(ids, select, Attend(key_mask=real, cache=cache, store=True))
    for end in (hi, ids.shape[1]):  # dual: the block alone; prefix: the block and the rest
        span = torch.zeros(ids.shape[0], end - lo, dtype=torch.bool)
        span[:, :hi - lo] = True
        got = im.logits(ids[:, lo:end], span, Attend(key_mask=real, start=lo, cache=cache))
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_padding_is_attended_by_nobody(im, prompts):
    """A left-padded row's logits are those of the row alone (RoPE is relative)."""
    ids, real = im.pad_left(prompts)
    select = real.clone()
    batch = im.logits(ids, select, Attend(key_mask=real))
    at = 0
    for p in prompts:
        alone = im.logits(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.bool))
        torch.testing.assert_close(batch[at:at + len(p)], alone, rtol=1e-4, atol=1e-4)
        at += len(p)
    # and padding does change the logits when it is attended: the mask is what keeps it out
    assert not torch.allclose(im.logits(ids, select), batch, atol=1e-3)


def test_stop_at_eos_ends_a_row_and_keeps_its_completion(im, prompts):
    eos = im.special["eos"]
    cfg = SamplerConfig(gen_length=16, steps=16, block_length=4, stop_at_eos=False)
    full = generate(im, prompts, cfg)
    stopped = generate(im, prompts, SamplerConfig(**{**cfg.__dict__, "stop_at_eos": True}))
    for f, s in zip(full, stopped):
        assert s.tokens == f.tokens and s.steps <= f.steps
    assert eos in im.stop_ids


@pytest.mark.parametrize("kwargs, flag", [
    ({"gen_length": 30, "block_length": 8}, "--block-length"),
    ({"gen_length": 32, "block_length": 8, "steps": 6}, "--steps"),
    ({"remasking": "lowest"}, "--remasking"),
    ({"cache": "triple"}, "--cache"),
    ({"threshold": 1.5}, "--threshold"),
    ({"steps": 0}, "--steps"),
])
def test_bad_sampler_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        SamplerConfig(**kwargs)


def test_a_prompt_longer_than_the_model_is_refused(im):
    with pytest.raises(ConfigError, match="maximum length 256"):
        generate(im, [[5] * 250], SamplerConfig(gen_length=16, steps=16, block_length=16))
