"""The held-out evaluation of each objective against a direct computation on a tiny model: the
autoregressive exact NLL (and its bytes from each sequence's second token), diffusion's
``bpb_without_first``, the SFT response bound given the prompt (and its masks, which never touch
a prompt)."""

import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.noise import eval_noise
from data_pipeline.shards import load_manifest
from framework.config import EvalConfig
from framework.evaluation.validator import HeldOutSet, Validator
from framework.model.model import vocab_cross_entropy
from tests.unit.inference_helpers import tiny_model

K = 3


@pytest.fixture(scope="module")
def models(world, small_tokenizer):
    return tiny_model(small_tokenizer, seed=1), tiny_model(small_tokenizer, seed=1, causal=True)


def sequences(im, n=5, length=24):
    tokens = torch.randint(10, im.tokenizer.vocab_size, (n, length),
                           generator=torch.Generator().manual_seed(0))
    return torch.where(tokens == im.mask_id, tokens + 1, tokens)


def validator(im, world):
    return Validator(EvalConfig(t_samples=K), [], world, im.model, micro_batch_size=4,
                     mask_id=im.mask_id, cross_entropy=vocab_cross_entropy)


def full_logits(im, x):
    with torch.no_grad():
        return im.model(x).double()


def test_eval_noise_from_a_start_masks_only_after_it():
    idx, start = torch.arange(6), torch.tensor([0, 3, 10, 19, 5, 1])
    noise = eval_noise(idx, 20, 4, seed=1, start=start)
    for i in range(6):
        region, count = 20 - int(start[i]), noise.mask[i].sum(-1)
        assert not noise.mask[i, :, :start[i]].any()
        assert bool(((count >= 1) & (count <= region)).all())
        assert torch.allclose(noise.weight[i], region / count.double())
    plain = eval_noise(idx, 20, 4, seed=1)
    from_zero = eval_noise(idx, 20, 4, seed=1, start=torch.zeros(6, dtype=torch.long))
    assert torch.equal(plain.mask, from_zero.mask) and torch.equal(plain.weight, from_zero.weight)


def test_autoregressive_validation_is_the_exact_nll_over_tokens_from_the_second(models, world):
    _, im = models
    tokens = sequences(im)
    piece_bytes = torch.from_numpy(im.tokenizer.piece_bytes())
    rest = int(piece_bytes[tokens[:, 1:]].sum())
    got = validator(im, world).evaluate_set(HeldOutSet("x", tokens, rest, "ar",
                                                       bytes_without_first=rest))
    logits = full_logits(im, tokens)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                         reduction="none")
    assert got["loss"] == pytest.approx(float(ce.mean()), rel=1e-6)
    assert got["bpb"] == pytest.approx(float(ce.sum()) / (math.log(2) * rest), rel=1e-6)
    assert got["bpb_without_first"] == got["bpb"]
    assert "loss_mc_stderr" not in got and not any(k.startswith("loss_by_ratio") for k in got)


def test_diffusion_bpb_without_first_leaves_the_first_token_out(models, world):
    im, _ = models
    tokens = sequences(im)
    n, length = tokens.shape
    piece_bytes = torch.from_numpy(im.tokenizer.piece_bytes())
    every, rest = int(piece_bytes[tokens].sum()), int(piece_bytes[tokens[:, 1:]].sum())
    got = validator(im, world).evaluate_set(HeldOutSet("x", tokens, every, "pretrain",
                                                       bytes_without_first=rest))
    noise = eval_noise(torch.arange(n), length, K, seed=0)
    total = after_first = 0.0
    for i in range(n):
        for d in range(K):
            mask = noise.mask[i, d]
            x = torch.where(mask, im.mask_id, tokens[i])[None]
            ce = F.cross_entropy(full_logits(im, x)[0], tokens[i], reduction="none") * mask
            total += float(noise.weight[i, d]) * float(ce.sum())
            after_first += float(noise.weight[i, d]) * float(ce[1:].sum())
    assert got["loss"] == pytest.approx(total / (K * n * length), rel=1e-6)
    assert got["bpb"] == pytest.approx(total / K / (math.log(2) * every), rel=1e-6)
    assert got["bpb_without_first"] == pytest.approx(after_first / K / (math.log(2) * rest),
                                                     rel=1e-6)


def test_sft_validation_is_the_response_bound_given_the_prompt(models, world, small_sft_dataset):
    im, _ = models
    shards = load_manifest(small_sft_dataset.parent / "holdout" / "manifest.json")
    held = HeldOutSet.read("sft", shards, 6, "sft")
    n, length = held.tokens.shape
    prompt = held.scored_from
    assert length == shards.seq_len and bool(((prompt > 0) & (prompt < length)).all())
    got = validator(im, world).evaluate_set(held)
    assert "bpb" not in got and "bpb_without_first" not in got  # padding has no bytes
    noise = eval_noise(torch.arange(n), length, K, seed=0, start=prompt)
    per_seq = []
    for i in range(n):
        terms = []
        for d in range(K):
            mask = noise.mask[i, d]
            assert not mask[:prompt[i]].any()
            x = torch.where(mask, im.mask_id, held.tokens[i])[None]
            ce = F.cross_entropy(full_logits(im, x)[0], held.tokens[i], reduction="none")
            terms.append(float(noise.weight[i, d]) * float((ce * mask).sum())
                         / (length - int(prompt[i])))
        per_seq.append(sum(terms) / K)
    assert got["loss"] == pytest.approx(sum(per_seq) / n, rel=1e-6)
