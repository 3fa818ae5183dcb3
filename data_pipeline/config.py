"""The typed settings of the data pipeline's components: the tokenizer, ``llada prepare``, the
training mixture and its loader, and the forward process the collator applies.

The framework's root config composes these as its ``data`` and ``objective`` sections (and
``llada prepare`` builds a ``PrepareConfig`` from its flags); nothing here knows about it. Each
check raises ``DataConfigError`` with a message that names the key, so a command line can print it
as one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from data_pipeline.errors import DataConfigError


def require(cond: bool, key: str, msg: str, error: type = DataConfigError) -> None:
    """``error`` ("key: msg") unless ``cond``; the framework's config checks raise its own."""
    if not cond:
        raise error(f"{key}: {msg}")


def positive(obj, section: str, *names: str, error: type = DataConfigError) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value > 0, f"{section}.{name}", f"must be > 0, got {value}", error)


SET_NAME = r"[A-Za-z0-9_.-]+"  # a dataset or validation set name: a metric key's part


@dataclass
class TokenizerConfig:
    """The tokenizer of a dataset: an existing SentencePiece model or Hugging Face tokenizer
    (data_pipeline/tokenizer.py), or a SentencePiece model trained on the inputs."""

    # an existing SentencePiece .model (must hold the mask token), a Hugging Face tokenizer
    # directory (tokenizer.json) or a carried tokenizer.hf.json; None: train a SentencePiece one
    model: Optional[str] = None
    vocab_size: int = 32000  # when training one
    train_bytes: int = 100_000_000  # text sampled from the inputs to train it
    seed: int = 0

    def __post_init__(self):
        positive(self, "tokenizer", "vocab_size", "train_bytes")
        require(self.seed >= 0, "tokenizer.seed", f"must be >= 0, got {self.seed}")


SFT_OVERFLOW = ("skip", "truncate")  # what prepare --sft does with a pair longer than seq_len


@dataclass
class PrepareConfig:
    """``llada prepare``: text/JSONL files -> tokenised fixed-length sequences in tar shards;
    with ``sft``, JSONL conversations -> (prompt, response) pairs, one per sample."""

    # globs of .txt/.jsonl(.gz); "stdlib": the embedded corpus (with sft: JSONL conversations;
    # "stdlib-sft": pairs derived from the embedded corpus)
    inputs: List[str] = field(default_factory=list)
    output: str = ""  # directory: NAME-000000.tar ..., manifest.json, the tokenizer
    name: str = "data"
    seq_len: int = 4096
    samples_per_shard: int = 4096
    jsonl_text_field: str = "text"
    workers: int = 0  # tokeniser processes; 0: one per CPU core
    seed: int = 0  # the order in which input files are visited, and the sequences' shuffle
    # prepared as `parts` independent parts (e.g. a Slurm array), this run being `part`, then
    # merged (data_pipeline/parts.py); 1: the whole dataset in this run
    parts: int = 1
    part: int = 0
    # documents held out into <output>/holdout/ (a dataset of its own): those whose seeded hash
    # falls below this fraction, so a document is in one split only, the same one on every run
    holdout_fraction: float = 0.0
    holdout_seed: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # SFT shards (data_pipeline/prepare_sft.py): the inputs are conversations (JSONL, or
    # stdlib-sft); a pair longer than seq_len is dropped (skip) or loses its response's end
    # (truncate), counted either way
    sft: bool = False
    sft_overflow: str = "skip"

    def __post_init__(self):
        require(len(self.inputs) > 0, "prepare.inputs", "at least one glob (or stdlib) is needed")
        require(bool(self.output), "prepare.output", "must be set")
        require(bool(re.fullmatch(SET_NAME, self.name)), "prepare.name",
                f"{self.name!r}: use letters, digits, '_', '.' and '-' only")
        positive(self, "prepare", "seq_len", "samples_per_shard")
        require(self.workers >= 0, "prepare.workers", "must be >= 0")
        require(self.seed >= 0, "prepare.seed", f"must be >= 0, got {self.seed}")
        require(self.parts >= 1, "prepare.parts", f"must be >= 1, got {self.parts}")
        require(0 <= self.part < self.parts, "prepare.part",
                f"must be in [0, {self.parts}) for {self.parts} parts, got {self.part}")
        holdout_fraction_ok(self.holdout_fraction, "prepare.holdout_fraction")
        require(0 <= self.holdout_seed < 2**63, "prepare.holdout_seed",
                f"must be in [0, 2^63), got {self.holdout_seed}")
        sft_overflow_ok(self.sft_overflow, "prepare.sft_overflow")
        if self.sft:
            require(self.parts == 1, "prepare.parts",
                    f"--sft prepares in one run (SFT sets are small), not in {self.parts} parts")
            # the pairs' ids must mean the fine-tuned model's tokens: never a tokenizer of their own
            require(bool(self.tokenizer.model), "prepare.tokenizer.model",
                    "--sft needs an existing tokenizer (--tokenizer MODEL): SFT fine-tunes a "
                    "model, and its tokenizer must be that model's")



def holdout_fraction_ok(value: float, key: str) -> None:
    require(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")


def sft_overflow_ok(value: str, key: str) -> None:
    require(value in SFT_OVERFLOW, key, f"must be one of {', '.join(SFT_OVERFLOW)}; got {value!r}")


@dataclass
class DatasetConfig:
    """One prepared dataset of the training mixture."""

    manifest: str = MISSING  # manifest.json written by ``llada prepare``
    weight: float = 1.0  # mixture weight; normalised over the datasets
    shards_url: Optional[str] = None  # e.g. "pipe:aws s3 cp s3://bucket/ds/{shard} -"; None: beside the manifest
    prepare_inputs: List[str] = field(default_factory=list)  # prepared from these on first run if the manifest is missing
    holdout_fraction: float = 0.0  # on first run: documents held out into <dir>/holdout/
    # on first run, as SFT shards (objective.kind=sft): a pair longer than data.seq_len is
    # dropped (skip) or cut (truncate), as llada prepare --sft-overflow
    sft_overflow: str = "skip"

    def __post_init__(self):
        if self.manifest != MISSING:
            require(bool(self.manifest), "data.datasets.manifest", "must be set")
        holdout_fraction_ok(self.holdout_fraction, "data.datasets.holdout_fraction")
        sft_overflow_ok(self.sft_overflow, "data.datasets.sft_overflow")
        require(self.weight > 0, "data.datasets.weight", f"must be > 0, got {self.weight}")
        require(self.shards_url is None or "{shard}" in self.shards_url, "data.datasets.shards_url",
                f"{self.shards_url!r} lacks {{shard}}, where each shard's file name goes")


@dataclass
class ValidationSetConfig:
    """One held-out set: evaluated during training (the framework's ``eval`` section says when)
    and reported as ``val/<name>/...``."""

    name: str = MISSING
    manifest: str = MISSING  # e.g. ``llada prepare --holdout-fraction``'s holdout/manifest.json
    shards_url: Optional[str] = None

    def __post_init__(self):
        if self.name != MISSING:
            require(bool(re.fullmatch(SET_NAME, self.name)), "data.validation.name",
                    f"{self.name!r}: use letters, digits, '_', '.' and '-' only")
        require(self.shards_url is None or "{shard}" in self.shards_url,
                "data.validation.shards_url", f"{self.shards_url!r} lacks {{shard}}")


@dataclass
class DataConfig:
    datasets: List[DatasetConfig] = field(default_factory=list)
    validation: List[ValidationSetConfig] = field(default_factory=list)  # held-out sets
    seq_len: int = 4096  # must equal the manifests' sequence length
    seed: int = 0  # shard permutation per epoch, in-shard shuffle, mixture draws
    # canonical streams the samples come from (data_pipeline/streams.py): the order of samples is
    # a function of the data config alone, under any data-parallel size and worker count that
    # divide it; null: one per sample of the global batch (the most readers a run can use).
    # Fixed when a run starts: a resume keeps its checkpoint's.
    streams: Optional[int] = None
    # units (whole shards, or pieces of shards of a dataset with fewer shards than streams) each
    # stream holds in memory at once (read whole, hash-checked) and draws samples from uniformly:
    # memory per DataLoader worker = its streams x datasets x open_shards x a shard's bytes
    open_shards: int = 4
    num_workers: int = 2  # DataLoader worker processes per rank (0: in the training process)
    prefetch_batches: int = 4  # steps of its streams' samples each worker makes ahead
    # first-run preparation of datasets that name prepare_inputs
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    samples_per_shard: int = 4096
    jsonl_text_field: str = "text"
    prepare_workers: int = 0

    def __post_init__(self):
        positive(self, "data", "seq_len", "open_shards", "prefetch_batches", "samples_per_shard")
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(self.streams is None or self.streams > 0, "data.streams",
                f"must be > 0 or null, got {self.streams}")
        require(self.prepare_workers >= 0, "data.prepare_workers", "must be >= 0")
        require(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed}")
        names = [v.name for v in self.validation]
        require(len(set(names)) == len(names), "data.validation",
                f"set names must differ, got {names}")


T_SAMPLING = ("uniform", "stratified", "antithetic")
# pretrain: LLaDA's masked diffusion on pretraining shards; sft: its SFT on SFT shards (llada
# prepare --sft); ar: the autoregressive baseline (causal attention, next-token CE) on
# pretraining shards
OBJECTIVES = ("pretrain", "sft", "ar")


@dataclass
class ObjectiveConfig:
    """The objective (the ``objective`` section): how t and the masks are drawn and how often a
    batch is cut, which the collator applies; and how an autoregressive model is adapted to
    diffusion (logit_shift, anneal_steps, ar_loss_weight: the README's adaptation keys).
    ``ar`` masks nothing (eps, t_sampling and mask_id unused) but cuts alike; ``sft`` never cuts
    (variable_length_prob unused: a cut would drop responses)."""

    kind: str = "pretrain"  # one of OBJECTIVES
    mask_id: Optional[int] = None  # None: the datasets' manifest; set: must match it
    eps: float = 1e-3  # p_mask = (1 - eps) t + eps
    variable_length_prob: float = 0.01  # the paper's 1% of batches cut to a random length
    t_sampling: str = "uniform"  # uniform (the paper) | stratified | antithetic (lower variance)
    seed: int = 0  # noise: t and masks are seeded by (seed, the sample's global index)
    # Adapting an autoregressive model (diffusion kinds only). Dream's logit shift: position j's
    # prediction is read at the output of position j - 1 (position 0's at itself), so the AR
    # head keeps its meaning; the sampler, the likelihood, validation and export honour it
    logit_shift: bool = False
    # DiffuLLaMA's attention-mask annealing: at step s each query attends every key before it
    # and each later key with probability min(1, s / anneal_steps); from then on, every key.
    # 0: bidirectional from the first step
    anneal_steps: int = 0
    # the mixed objective: loss = diffusion loss + ar_loss_weight x the next-token CE of the
    # same batch's clean sequences under causal attention (each micro-batch runs both); 0: off
    ar_loss_weight: float = 0.0

    def __post_init__(self):
        require(self.kind in OBJECTIVES, "objective.kind",
                f"must be one of {', '.join(OBJECTIVES)}; got {self.kind!r}")
        require(self.mask_id is None or self.mask_id >= 0, "objective.mask_id",
                f"must be >= 0, got {self.mask_id}")
        require(0.0 < self.eps < 1.0, "objective.eps", f"must be in (0, 1), got {self.eps}")
        require(0.0 <= self.variable_length_prob <= 1.0, "objective.variable_length_prob",
                f"must be in [0, 1], got {self.variable_length_prob}")
        require(self.seed >= 0, "objective.seed", f"must be >= 0, got {self.seed}")
        require(self.t_sampling in T_SAMPLING, "objective.t_sampling",
                f"must be one of {', '.join(T_SAMPLING)}; got {self.t_sampling!r}")
        require(self.anneal_steps >= 0, "objective.anneal_steps",
                f"must be >= 0, got {self.anneal_steps}")
        require(0.0 <= self.ar_loss_weight < float("inf"), "objective.ar_loss_weight",
                f"must be a finite number >= 0, got {self.ar_loss_weight}")
        if self.kind == "ar":  # its model is causal and predicts the next token already
            for name, on in (("logit_shift", self.logit_shift),
                             ("anneal_steps", self.anneal_steps > 0),
                             ("ar_loss_weight", self.ar_loss_weight > 0)):
                require(not on, f"objective.{name}", "adapts an autoregressive model to "
                        "diffusion; objective.kind=ar trains the autoregressive model itself")

    @property
    def mixed(self) -> bool:
        """Whether each micro-batch carries the next-token rows of the mixed objective."""
        return self.ar_loss_weight > 0
