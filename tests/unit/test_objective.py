"""The LLaDA loss (framework/training/objective.py) on the forward process's output: a hand
count, no gradient at unmasked positions, divided by all tokens."""

import math

import torch

from data_pipeline.noise import Noise, forward_process, sample_noise
from framework.training.objective import llada_loss

MASK = 7


def test_loss_equals_hand_computation():
    # b = 2, L = 3, V = 4. Sequence 0: t = 0.5, masks position 1; sequence 1: t = 1, masks 0 and 2.
    eps = 1e-3
    tokens = torch.tensor([[1, 2, 3], [0, 1, 2]])
    noise = Noise(t=torch.tensor([0.5, 1.0]),
                  u=torch.tensor([[0.9, 0.1, 0.99], [0.2, 2.0, 0.3]]))
    noisy, mask, p_mask = forward_process(tokens, noise, mask_id=3, eps=eps)
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 0.0], [0.5, 0.5, 2.0, 0.0]])
    targets = tokens[mask]  # [2, 0, 2]
    masked_p = p_mask[:, None].expand_as(tokens)[mask]
    loss = llada_loss(logits, targets, masked_p, tokens.numel())

    def ce(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    p0, p1 = (1 - eps) * 0.5 + eps, (1 - eps) * 1.0 + eps
    expected = (ce(logits[0].tolist(), 2) / p0 + ce(logits[1].tolist(), 0) / p1
                + ce(logits[2].tolist(), 2) / p1) / 6
    assert abs(loss.item() - expected) < 1e-6


def test_unmasked_positions_get_no_gradient():
    b, length, vocab = 3, 20, 11
    tokens = torch.randint(0, 10, (b, length))
    _, mask, p_mask = forward_process(tokens, sample_noise(torch.arange(b), length, 5), 10, 1e-3)
    assert mask.any() and (~mask).any()
    logits = torch.randn(b, length, vocab, requires_grad=True)
    loss = llada_loss(logits[mask], tokens[mask], p_mask[:, None].expand_as(tokens)[mask], b * length)
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)


def test_loss_is_divided_by_all_tokens_not_masked_count():
    tokens = torch.zeros(2, 10, dtype=torch.long)
    logits = torch.zeros(3, 5)  # uniform: CE = ln 5 at each of 3 masked positions
    p = torch.full((3,), 0.5)
    loss = llada_loss(logits, tokens.flatten()[:3], p, tokens.numel())
    assert abs(loss.item() - 3 * math.log(5) / 0.5 / 20) < 1e-6


def test_one_objective_loss_is_each_objectives_formula():
    """ObjectiveLoss (what trains) against the plain formulas: the LLaDA loss over b x L, the
    SFT loss (per-sequence division by the response length), the mean next-token CE."""
    import torch.nn.functional as F

    from data_pipeline.collate import next_token_targets
    from framework.training.objective import LossByT, ObjectiveLoss, sft_loss, weighted

    torch.manual_seed(0)
    b, length, vocab = 3, 7, 11
    logits = torch.randn(b, length, vocab)
    tokens = torch.randint(vocab, (b, length))
    p_mask = torch.tensor([0.3, 0.6, 0.9])
    mask = torch.rand(b, length) < p_mask[:, None]
    ce = weighted(lambda x, y: F.cross_entropy(x, y, reduction="none"))
    loss = ObjectiveLoss(ce, lambda _: None, LossByT())
    masked_p = p_mask[:, None].expand_as(tokens)[mask]
    pretrain = loss(logits[mask], (tokens, mask, p_mask, torch.full((b,), float(length))))
    assert torch.allclose(pretrain, llada_loss(logits[mask], tokens[mask], masked_p, b * length))

    response = torch.tensor([4.0, 2.0, 6.0])
    got = loss(logits[mask], (tokens, mask, p_mask, response))
    want = sft_loss(logits[mask], tokens[mask], masked_p,
                    response[:, None].expand_as(tokens)[mask], batch_size=b)
    assert torch.allclose(got, want)

    targets, predicted = next_token_targets(tokens)
    got = ObjectiveLoss(ce, lambda _: None, None)(
        logits[predicted], (targets, predicted, torch.ones(b), torch.full((b,), length - 1.0)))
    want = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    assert torch.allclose(got, want)
