"""The losses of the three objectives (../shared/LLADA.md), one formula for all: the CE at the
positions a batch selects, each divided by its sequence's p_mask and its sequence's divisor
(``TrainBatch.norm``), summed and divided by the batch size:

- pretraining: the masked positions, divisor L: the LLaDA loss (CE / p_mask over b x L);
- SFT: the masked response positions, divisor the response length: the SFT loss;
- autoregressive: every position but the last, p_mask 1, divisor L - 1: the mean next-token CE.

The forward process (t per sequence, the masks, the 1% cut) is the data pipeline's
(data_pipeline/noise.py): the collator applies it, so a batch arrives here already corrupted.

Adapting an autoregressive model (the README's adaptation keys): with ``objective.logit_shift``
the head runs at each predicted position's predecessor (Dream's shift: data_pipeline/collate.py
``shifted_reads``) and the loss takes its rows in the targets' order; with
``objective.ar_loss_weight`` a micro-batch's second half is its sequences clean, as next-token
rows (``MixedCollator``) weighted into the same sum, and the sum is divided by the first half's
rows only; with ``objective.anneal_steps`` the step's attention is DiffuLLaMA's annealed mask
(``Objective.attention``: the trainer sets it on the model).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from data_pipeline.collate import TrainBatch, read_mask, shifted_reads
from data_pipeline.config import ObjectiveConfig
from data_pipeline.noise import T_BUCKETS, t_bucket_names
from data_pipeline.splitmix import key, subkey
from framework.model.model import take_rows
from framework.training.optimizer import NonFiniteGuard

# (head output, targets [N], scale [N]) -> (sum_i scale_i x CE_i, the terms [N] detached)
HeadLoss = Callable[[object, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


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
    them; ``ObjectiveLoss`` passes p_mask x the sequence's divisor as ``masked_p``."""
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


_ANNEAL_STREAM = 0x3F84D5B5B5470917  # the annealed masks' own random stream


def anneal_mask(step: int, anneal_steps: int, seq_len: int, seed: int,
                device: torch.device) -> Optional[torch.Tensor]:
    """DiffuLLaMA's annealed attention mask at optimizer step ``step`` (0-based): with
    r = step / anneal_steps, query i attends every key j <= i and each key j > i with probability
    r (one Bernoulli per (i, j), the same for every sequence of the step), as [1, 1, S, S] bool;
    None from step ``anneal_steps`` on (every key: the fast path) and when ``anneal_steps`` is 0.
    Seeded by (seed, step): every tensor- and pipeline-parallel rank builds the same mask itself,
    and a resumed run the same one again. Drawn at the full ``seq_len`` (a batch cut shorter
    reads its corner)."""
    if step >= anneal_steps:
        return None
    ratio = step / anneal_steps
    gen = torch.Generator(device=device).manual_seed(
        int(subkey(key(seed, _ANNEAL_STREAM), step)[0]) & (2**63 - 1))
    later = torch.rand(seq_len, seq_len, generator=gen, device=device) < ratio
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return (causal | later)[None, None]


class LossByT:
    """Each sequence's loss (its CE / p_mask terms over L, so the batch's mean is the loss) summed
    by the tenth of [0, 1] its mask ratio falls in: where the model is weak (nearly clean or nearly
    all-masked inputs). Kept on the device, so there is no host sync per micro-batch; a step's
    share is kept only when the step is (a skipped step's NaN would poison the window)."""

    def __init__(self):
        self.step_totals = self.window = None  # [2, T_BUCKETS]: loss sums, sequence counts

    def add(self, terms: torch.Tensor, mask: torch.Tensor, p_mask: torch.Tensor,
            positions: Optional[torch.Tensor] = None) -> None:
        """``terms`` [N]: each selected position's share of its sequence's loss (already divided
        by the sequence's divisor), so a sequence's sum is its loss; ``positions``: their flat
        indices in ``mask`` (else found from it)."""
        if positions is None:
            positions = mask.reshape(-1).nonzero().squeeze(1)
        full = torch.zeros(mask.numel(), dtype=torch.float64, device=terms.device)
        full[positions] = terms.detach().double()
        per_seq = full.view(mask.shape).sum(1)
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


def weighted(cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> HeadLoss:
    """A ``HeadLoss`` from a per-position CE of logits (the unfused head)."""
    def head_loss(logits, targets, scale):
        terms = cross_entropy(logits, targets).float() * scale.float()
        return terms.sum(), terms.detach()
    return head_loss


class MaskedLabels(NamedTuple):
    """A micro-batch's labels at its selected positions, made on the host from the collator's
    tensors (``masked_labels``) so that neither the head's selection nor the loss's needs the
    device to say how many positions there are (boolean indexing on CUDA waits for the GPU)."""
    positions: torch.Tensor  # [N] int64: flat indices into [b, l], row-major
    targets: torch.Tensor  # [N]
    scale: torch.Tensor  # [N] fp32: 1 / (p_mask x the sequence's divisor)
    mask: torch.Tensor  # [b, l] bool
    p_mask: torch.Tensor  # [b]
    read: torch.Tensor  # [M] int64: where the head runs (``positions``, or their shifted reads)
    order: Optional[torch.Tensor]  # [N] int64: the head's row of each target (None: the same)
    sequences: int  # what the summed loss is divided by: the batch's (diffusion) rows
    scored: int  # the first ``scored`` positions are the diffusion rows' (the loss by t's)

    def to(self, device: torch.device) -> "MaskedLabels":
        pin = device.type == "cuda"  # pinned: the copies run without blocking the host

        def move(x):
            if not isinstance(x, torch.Tensor):
                return x
            return x.pin_memory().to(device, non_blocking=True) if pin else x.to(device)
        return MaskedLabels(*(move(x) for x in self))


def masked_labels(targets: torch.Tensor, mask: torch.Tensor, p_mask: torch.Tensor,
                  norm: torch.Tensor, shift: bool = False, mixed: bool = False) -> MaskedLabels:
    """``shift``: the head reads each prediction at the position before (the diffusion rows';
    objective.logit_shift); ``mixed``: the second half of the rows are next-token rows
    (objective.ar_loss_weight), which count in the sum but not in the divisor."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    per_position = (p_mask.float() * norm.float())[:, None].expand_as(targets).reshape(-1)
    rows = mask.shape[0] // 2 if mixed else mask.shape[0]
    read, order = positions, None
    if shift:
        read, order = shifted_reads(positions, mask.shape[1], rows=rows)
    scored = int(mask[:rows].sum()) if mixed else len(positions)
    return MaskedLabels(positions, targets.reshape(-1)[positions], 1.0 / per_position[positions],
                        mask, p_mask, read, order, rows, scored)


class ObjectiveLoss:
    """The loss of one micro-batch from the head's output at the selected positions, with
    ``labels`` a ``MaskedLabels`` (the trainer's, made on the host) or (targets [b, l],
    mask [b, l], p_mask [b], norm [b]) of a ``TrainBatch`` (DeepSpeed's pipeline engine hands
    the last stage these). One callable for both engines: the trainer calls it after the
    forward, the pipeline engine as the last stage's loss_fn. ``head_loss(out, targets, scale)``:
    sum_i scale_i x CE_i and the terms (framework/model/model.py ``head_loss``: the logits, or
    the head's input and weight fused with the CE); ``observe`` sees every loss (the trainer's
    non-finite guard); ``by_t`` collects the loss by mask ratio (None for the autoregressive
    objective, which masks nothing); both are the trainer's: this only feeds them. ``shift``
    and ``mixed``: objective.logit_shift and the mixed objective (``masked_labels``)."""

    def __init__(self, head_loss: HeadLoss, observe: Callable[[torch.Tensor], None],
                 by_t: Optional[LossByT], shift: bool = False, mixed: bool = False):
        self.head_loss, self.observe, self.by_t = head_loss, observe, by_t
        self.shift, self.mixed = shift, mixed

    def labels(self, targets, mask, p_mask, norm) -> MaskedLabels:
        return masked_labels(targets, mask, p_mask, norm, self.shift, self.mixed)

    def __call__(self, out, labels) -> torch.Tensor:
        if not isinstance(labels, MaskedLabels):
            labels = self.labels(*labels)
        total, terms = self.head_loss(take_rows(out, labels.order), labels.targets, labels.scale)
        loss = total / labels.sequences
        self.observe(loss)
        if self.by_t is not None:  # the diffusion rows' (the next-token rows have no t)
            n, rows = labels.scored, labels.sequences
            self.by_t.add(terms[:n], labels.mask[:rows], labels.p_mask[:rows],
                          labels.positions[:n])
        return loss


class Objective:
    """The objective as the trainer sees it: the loss of a micro-batch (``loss``: the trainer
    calls it after the forward, the pipeline engine as its last stage's loss_fn) and what a step
    learns from its losses, which the loss collects as it is called: whether any was non-finite
    (the guard: its verdict, agreed by every rank, skips the step; the optimizer asks it too)
    and the loss by mask ratio (not for the autoregressive objective, which masks nothing); and
    what the model must do for it: where the head runs (``labels``, ``head_mask``) and what the
    step's attention attends (``attention``)."""

    def __init__(self, head_loss: HeadLoss, device: torch.device,
                 cfg: Optional[ObjectiveConfig] = None, seq_len: int = 0):
        """``cfg``: the objective section (None: its defaults); ``seq_len``: data.seq_len, the
        length an annealed mask is drawn at."""
        cfg = cfg if cfg is not None else ObjectiveConfig()
        self.cfg, self.device, self.seq_len = cfg, device, seq_len
        self.guard = NonFiniteGuard(device)
        self.by_t = LossByT()
        self.loss = ObjectiveLoss(head_loss, self.guard.observe,
                                  self.by_t if cfg.kind != "ar" else None,
                                  shift=cfg.logit_shift, mixed=cfg.mixed)

    def labels(self, batch: TrainBatch) -> MaskedLabels:
        """The labels of a micro-batch, on the host (the head runs at ``read``)."""
        return self.loss.labels(batch.targets, batch.mask, batch.p_mask, batch.norm)

    def head_mask(self, batch: TrainBatch) -> torch.Tensor:
        """[rows, l] bool: where the head runs, as the pipeline's first stage passes it on."""
        if not self.cfg.logit_shift:
            return batch.mask
        return read_mask(self.labels(batch).read, batch.mask.shape)

    def attention(self, step: int, rows: int) -> Tuple[Optional[torch.Tensor], int]:
        """(mask, causal rows) of the attention at step index ``step`` for micro-batches of
        ``rows`` rows (model/attention.py ``set_training_mask``): the annealed mask while
        objective.anneal_steps lasts, the mixed objective's next-token rows causal."""
        mask = anneal_mask(step, self.cfg.anneal_steps, self.seq_len, self.cfg.seed, self.device)
        return mask, rows // 2 if self.cfg.mixed else 0

    def start_step(self) -> None:
        self.guard.reset()

    def end_step(self) -> bool:
        """Whether the step is skipped (any rank's loss non-finite; collective); its loss by
        mask ratio is kept only when it is not."""
        skipped = self.guard.verdict()
        self.by_t.end_step(keep=not skipped)
        return skipped
