"""Inference of an autoregressive baseline (objective ar): greedy decoding equals the argmax of
the plain causal forward token by token, padded batches decode as the rows alone, and the
log-likelihood is exact (the sum of next-token log-probabilities)."""

import pytest
import torch
import torch.nn.functional as F

from framework.config import ConfigError
from framework.inference.likelihood import loglikelihoods
from framework.inference.sampler import SamplerConfig, generate
from tests.unit.inference_helpers import full_logits, tiny_model


@pytest.fixture(scope="module")
def im(world, small_tokenizer):
    return tiny_model(small_tokenizer, seed=5, causal=True)


@pytest.fixture(scope="module")
def prompts(im):
    texts = ["def parse(self, text):", "import os", "class Handler(object):\n    "]
    return [im.document_start() + im.tokenizer.encode(t) for t in texts]


def greedy_reference(im, prompt, n):
    logits_of, x = full_logits(im), list(prompt)
    for _ in range(n):
        x.append(int(logits_of(torch.tensor([x]))[0, -1].argmax()))
    return x[len(prompt):]


def test_greedy_decoding_is_the_causal_argmax_in_any_batch(im, prompts):
    cfg = SamplerConfig(gen_length=9, steps=9, block_length=9, stop_at_eos=False, batch_size=3)
    together = generate(im, prompts, cfg)  # prompts of different lengths: left-padded
    for prompt, got in zip(prompts, together):
        assert got.tokens == greedy_reference(im, prompt, 9)[:len(got.tokens)]
        assert got.tokens == generate(im, [prompt], cfg)[0].tokens


def test_temperature_sampling_is_seeded_per_prompt(im, prompts):
    cfg = SamplerConfig(gen_length=6, steps=6, block_length=6, temperature=1.0, seed=3,
                        stop_at_eos=False, batch_size=3)
    a = [c.tokens for c in generate(im, prompts, cfg)]
    b = [c.tokens for c in generate(im, prompts,
                                    SamplerConfig(**{**cfg.__dict__, "batch_size": 1}))]
    assert a == b and a != [c.tokens for c in generate(im, prompts, SamplerConfig(
        **{**cfg.__dict__, "seed": 4}))]


def test_loglikelihood_is_exact(im):
    ctx, cont = im.tokenizer.encode("for item in"), im.tokenizer.encode(" items:")
    (est,) = loglikelihoods(im, [(ctx, cont)], samples=4)
    seq = im.document_start() + ctx + cont
    logits = full_logits(im)(torch.tensor([seq]))[0].double()
    off = len(seq) - len(cont)
    want = -F.cross_entropy(logits[off - 1:-1], torch.tensor(cont), reduction="sum")
    assert est.loglik == pytest.approx(float(want), rel=1e-5) and est.stderr == 0.0
    padded = loglikelihoods(im, [(ctx, cont), (ctx[:1], cont)], samples=4)[1]  # left-padded
    alone = loglikelihoods(im, [(ctx[:1], cont)], samples=4)[0]
    assert padded.loglik == pytest.approx(alone.loglik, rel=1e-5) != est.loglik
    with pytest.raises(ConfigError, match="--cfg-scale"):
        loglikelihoods(im, [(ctx, cont)], cfg_scale=1.0)
