"""The LLaDA masked-diffusion objective (../shared/LLADA.md): the forward process and the loss.

Pure functions of their inputs. The noise (t per sequence, a uniform draw per token) comes from
``sample_noise``, seeded by each sample's global index, so tensor/pipeline-parallel peers and a
resumed run corrupt a given sample identically whatever rank or step it lands on.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

_SEED_STRIDE = 1_000_003  # keeps (seed, index) pairs apart when folded into one 63-bit seed


class Noise(NamedTuple):
    t: torch.Tensor  # [b] float32, t ~ U(0, 1) per sequence
    u: torch.Tensor  # [b, L] float32, one uniform per token; a token is masked when u < p_mask


class Corrupted(NamedTuple):
    noisy: torch.Tensor  # [b, L] token ids with masked positions set to the mask id
    mask: torch.Tensor  # [b, L] bool, True where masked (these positions enter the loss)
    p_mask: torch.Tensor  # [b] float32, the masking probability of each sequence


# A counter-based generator (splitmix64 / lowbias32 finalisers): uniform number j of sample i
# is a pure function of (seed, i, j). Vectorised over a whole batch, with no generator state to seed, save or replay.
_T_STREAM = np.uint64(0xD1B54A32D192ED03)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _to_unit(x: np.ndarray) -> np.ndarray:
    """The top 24 bits as a float32 in [0, 1): every value exactly representable."""
    return (x >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def _token_uniforms(base: np.ndarray, seq_len: int) -> np.ndarray:
    """[b, seq_len] uniforms: a 32-bit finaliser (lowbias32) of (per-sample key + position),
    half the work of 64-bit mixing on the per-token hot path; the key itself is 64-bit mixed."""
    key = (base >> np.uint64(32)).astype(np.uint32) ^ base.astype(np.uint32)
    with np.errstate(over="ignore"):
        x = key[:, None] + np.arange(seq_len, dtype=np.uint32) * np.uint32(0x9E3779B9)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return (x >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def sample_noise(sample_index: torch.Tensor, seq_len: int, seed: int,
                 t_sampling: str = "uniform") -> Noise:
    """t and per-token uniforms of each sample, a pure function of (seed, its global index).

    Drawn at full ``seq_len`` so a batch cut to a shorter length (1% variable length) masks each
    kept position exactly as the uncut batch would. ``t_sampling`` (lower-variance estimators of
    the same expectation, across the micro-batch): ``stratified`` puts one t in each of the b
    strata [k/b, (k+1)/b), assigned to rows by a permutation seeded by the batch's first index;
    ``antithetic`` pairs rows (2k, 2k+1) as (t, 1 - t).
    """
    idx = sample_index.cpu().numpy().astype(np.uint64)
    base = _mix64(_mix64(idx) ^ _mix64(np.full_like(idx, seed & (2**64 - 1))))
    u = _token_uniforms(base, seq_len)
    t = _to_unit(_mix64(base ^ _T_STREAM))
    b = len(idx)
    if t_sampling == "stratified" and b > 1:
        order = np.argsort(_mix64(base[:1] ^ _mix64(np.arange(b, dtype=np.uint64))), kind="stable")
        t = (order.astype(np.float32) + t) / np.float32(b)
    elif t_sampling == "antithetic" and b > 1:
        t = t.copy()
        t[1:b - b % 2:2] = 1.0 - t[0:b - b % 2:2]
    elif t_sampling not in ("uniform", "stratified", "antithetic"):
        raise ValueError(f"t_sampling: unknown {t_sampling!r}")
    return Noise(torch.from_numpy(np.ascontiguousarray(t)), torch.from_numpy(u))


def forward_process(tokens: torch.Tensor, noise: Noise, mask_id: int, eps: float) -> Corrupted:
    """Mask each token independently with its sequence's p_mask = (1 - eps) t + eps."""
    b, length = tokens.shape
    p_mask = (1.0 - eps) * noise.t.to(tokens.device) + eps
    u = noise.u[:, :length].to(tokens.device)
    mask = u < p_mask[:, None]
    noisy = torch.where(mask, torch.full_like(tokens, mask_id), tokens)
    return Corrupted(noisy, mask, p_mask)


def llada_loss(
    masked_logits: torch.Tensor,
    masked_targets: torch.Tensor,
    masked_p: torch.Tensor,
    num_tokens: int,
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """sum over masked positions of CE(logits_i, x_i) / p_mask(seq of i), divided by b x L.

    ``masked_logits`` [N, V] are the logits at the N masked positions only (the model computes
    its head there alone); ``masked_p`` [N] is the p_mask of each position's sequence;
    ``num_tokens`` is b x L of the (possibly cut) batch: the paper divides by all tokens, not by
    the masked count, which keeps the loss an ELBO comparable across runs.
    ``cross_entropy`` returns per-position CE; tensor parallelism passes the vocab-parallel one.
    """
    terms = llada_loss_terms(masked_logits, masked_targets, masked_p, cross_entropy)
    return terms.sum() / num_tokens


def llada_loss_terms(masked_logits, masked_targets, masked_p, cross_entropy=None) -> torch.Tensor:
    """[N] CE(logits_i, x_i) / p_mask(seq of i) at each masked position: ``llada_loss`` sums
    them; the per-sequence sums give the loss by mask ratio (``LossByT``)."""
    return _cross_entropy(masked_logits, masked_targets, cross_entropy) / masked_p.float()


def sft_loss(
    masked_logits: torch.Tensor,
    masked_targets: torch.Tensor,
    masked_p: torch.Tensor,
    masked_response_len: torch.Tensor,
    batch_size: int,
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """SFT (../shared/LLADA.md): each sequence's sum of CE / p_mask over its masked response
    positions, divided by its response length (EOS padding included), then the mean over the
    batch. ``masked_response_len`` [N] is the response length of each position's sequence."""
    ce = _cross_entropy(masked_logits, masked_targets, cross_entropy)
    return (ce / (masked_p.float() * masked_response_len.float())).sum() / batch_size


def _cross_entropy(logits, targets, cross_entropy) -> torch.Tensor:
    if cross_entropy is None:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    return cross_entropy(logits, targets).float()


T_BUCKETS = 10  # the loss by mask ratio: tenths of [0, 1]


def t_bucket_names() -> list:
    return [f"{k / T_BUCKETS:.1f}-{(k + 1) / T_BUCKETS:.1f}" for k in range(T_BUCKETS)]


class LossByT:
    """Each sequence's loss (its CE / p_mask terms over L, so the batch's mean is the loss) summed
    by the tenth of [0, 1] its mask ratio falls in: where the model is weak (nearly clean or nearly
    all-masked inputs). Kept on the device, so there is no host sync per micro-batch; a step's
    share is kept only when the step is (a skipped step's NaN would poison the window)."""

    def __init__(self):
        self.step_totals = self.window = None  # [2, T_BUCKETS]: loss sums, sequence counts

    def add(self, terms: torch.Tensor, mask: torch.Tensor, p_mask: torch.Tensor) -> None:
        full = torch.zeros(mask.shape, dtype=torch.float64, device=terms.device)
        per_seq = full.masked_scatter_(mask, terms.detach().double()).sum(1) / mask.shape[1]
        bucket = (p_mask.float() * T_BUCKETS).long().clamp_(0, T_BUCKETS - 1)
        if self.step_totals is None:
            self.step_totals = torch.zeros(2, T_BUCKETS, dtype=torch.float64, device=terms.device)
        self.step_totals[0].index_add_(0, bucket, per_seq)
        self.step_totals[1].index_add_(0, bucket, torch.ones_like(per_seq))

    def end_step(self, keep: bool) -> None:
        if self.step_totals is not None:
            if keep:
                self.window = (self.step_totals if self.window is None
                               else self.window + self.step_totals)
            self.step_totals = None

    def take(self, device: torch.device, reduce: Callable[[torch.Tensor], None]) -> dict:
        """{bucket name: mean loss} of the steps since the last take, over what ``reduce`` (an
        in-place all-reduce) sums, buckets no sequence fell in left out; resets the window."""
        window = self.window if self.window is not None else torch.zeros(
            2, T_BUCKETS, dtype=torch.float64, device=device)
        reduce(window)
        self.window = None
        sums, counts = window.tolist()
        return {name: s / c for name, s, c in zip(t_bucket_names(), sums, counts) if c > 0}


class PretrainLoss:
    """The loss of one micro-batch from the head's logits at the masked positions, with
    ``labels`` = (targets [b, l], mask [b, l], p_mask [b]). One callable for both engines: the
    trainer calls it after the forward, DeepSpeed's pipeline engine as the last stage's loss_fn.
    ``observe`` sees every loss (the trainer's non-finite guard); ``by_t`` collects the loss by
    mask ratio."""

    def __init__(self, cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 observe: Callable[[torch.Tensor], None]):
        self.cross_entropy, self.observe = cross_entropy, observe
        self.by_t = LossByT()

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        targets, mask, p_mask = labels
        masked_p = p_mask[:, None].expand_as(targets)[mask]
        terms = llada_loss_terms(logits, targets[mask], masked_p, self.cross_entropy)
        loss = terms.sum() / targets.numel()
        self.observe(loss)
        self.by_t.add(terms, mask, p_mask)
        return loss
