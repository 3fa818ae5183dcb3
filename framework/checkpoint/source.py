"""Trained weights from wherever they are: a checkpoint of any layout (a run directory, its
``checkpoints/`` or a ``step_N`` directory: the full weights through resharding's full-tensor
reader), an ``llada export`` directory (config.json + safetensors + tokenizer), or a Hugging
Face Llama/Qwen2/Qwen3 causal LM directory (hf_causal.py). Inference loads a model from one
(framework/inference/model.py); ``init.from`` starts a run from one, of any objective: the
architecture is shared, so a diffusion run can start from autoregressive weights (ours or a
Hugging Face model's) and SFT from a pretraining checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from framework.config import ConfigError, ModelConfig

EXPORT_CONFIG = "config.json"


@dataclass
class WeightSource:
    weights: Dict[str, torch.Tensor]  # full float32 tensors by global name
    model: ModelConfig
    objective: str  # what trained them: pretrain | sft | ar
    tokenizer: Path  # its tokenizer: a file (tokenizer.model, tokenizer.hf.json) or a
    # Hugging Face directory (tokenizer.json), as data_pipeline.tokenizer.load_tokenizer reads
    max_length: int  # the sequence length it was trained at
    source: str  # the step_N directory or the export directory read
    step: Optional[int] = None  # the checkpoint's step (None for an export)
    logit_shift: bool = False  # position i's prediction is read at i - 1 (Dream's shift)

    def tokenizer_sha256(self) -> str:
        """The sha256 of the tokenizer as a dataset carries it; ConfigError when the directory's
        tokenizer cannot be read (none, or no usable mask id)."""
        from data_pipeline.errors import DataConfigError
        from data_pipeline.tokenizer import load_tokenizer
        if self.tokenizer.is_file():
            return hashlib.sha256(self.tokenizer.read_bytes()).hexdigest()
        try:
            return load_tokenizer(self.tokenizer, f"init.from: {self.source}").sha256
        except DataConfigError as e:  # a broken or mask-less tokenizer: its own message
            raise ConfigError(str(e)) from None


def is_export_dir(path: Path) -> bool:
    return (Path(path) / EXPORT_CONFIG).is_file() and not (Path(path) / "meta.json").is_file()


def read_source(path, warn=print, key: str = "MODEL", verify: bool = True) -> WeightSource:
    """The weights at ``path``. ConfigError naming ``key`` when it is neither a checkpoint nor
    an export; the readers' own errors (HFFormatError, ReshardError) for damaged ones."""
    from framework.checkpoint.files import checkpoint_tokenizer
    from framework.checkpoint.hf_files import (SHIFT_KEY, checkpoint_objective,
                                               checkpoint_shift, open_checkpoint,
                                               read_causal_dir, read_hf_dir)
    from framework.checkpoint.hf_mapping import OBJECTIVE_KEY, config_value, model_config_from_hf
    from framework.checkpoint.reshard import Layout, read_weights

    from framework.hf_config import is_causal_config, read_config_json

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if is_export_dir(path):
        config = read_config_json(path)
        # the directory as llada prepare --tokenizer DIR reads it (data_pipeline/tokenizer.py):
        # the file we carry (our exports), else its tokenizer.json (a Llama 2 directory's
        # tokenizer.model beside it too), else a SentencePiece tokenizer.model
        tokenizer = path
        if is_causal_config(config):  # a Hugging Face causal LM, or our AR baseline's export
            weights, cfg, config = read_causal_dir(path)
            return WeightSource(weights, cfg, config.get(OBJECTIVE_KEY, "ar"), tokenizer,
                                int(config.get("max_position_embeddings") or 4096), str(path),
                                logit_shift=bool(config.get(SHIFT_KEY, False)))
        cfg = model_config_from_hf(config, f"{path / EXPORT_CONFIG}")
        return WeightSource(read_hf_dir(path, cfg), cfg, config.get(OBJECTIVE_KEY, "pretrain"),
                            tokenizer, int(config_value(config, "max_sequence_length") or 4096),
                            str(path), logit_shift=bool(config.get(SHIFT_KEY, False)))
    try:
        tag, meta, cfg = open_checkpoint(path, warn, key, verify=verify)
    except ConfigError as e:
        if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
            raise  # a checkpoint, but a damaged or incomplete one: its own message
        raise ConfigError(f"{e}; {path} is neither a checkpoint (a run directory, its "
                          f"checkpoints/ or a step_N directory) nor an llada export "
                          f"directory ({EXPORT_CONFIG} and safetensors)") from None
    return WeightSource(read_weights(tag, Layout.saved(meta["layout"])), cfg,
                        checkpoint_objective(meta), checkpoint_tokenizer(tag),
                        int(meta["config"]["data"]["seq_len"]), str(tag), int(meta["step"]),
                        logit_shift=checkpoint_shift(meta))


def copy_weights(model: torch.nn.Module, src: WeightSource, key: str,
                 slice_for=lambda name, full: full) -> None:
    """Every parameter of ``model`` (global names) from ``src``, after ``slice_for`` (this
    rank's tensor-parallel slice); ConfigError naming ``key`` if one is missing or of another
    shape (another architecture)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = src.weights.get(name)
            part = None if full is None else slice_for(name, full)
            if part is None or part.shape != p.shape:
                raise ConfigError(f"{key}: {src.source}: parameter {name} is missing or of "
                                  "another shape (another model architecture)")
            p.copy_(part)


def init_from(model: torch.nn.Module, path: Path, cfg: ModelConfig, tp_rank: int, tp: int,
              tokenizer_sha256: str, warn=print,
              damaged: Callable[[Path], List[str]] = lambda _: []) -> WeightSource:
    """``init.from``: this rank's slice of the weights at ``path`` (a checkpoint or an export),
    which must be of ``cfg``'s architecture and tokenised like the run's data (``tokenizer_sha256``:
    the datasets' tokenizer): the same ids must mean the same tokens. ``damaged``: a
    checkpoint's damaged files, checked by all ranks together (collective)."""
    from framework.checkpoint.hf_mapping import HFFormatError
    from framework.checkpoint.reshard import ReshardError
    from framework.checkpoint.resume import model_section
    from framework.config import to_dict
    from framework.model.params import padded_vocab_size
    from framework.model.weights import shard

    try:
        src = read_source(path, warn, key="init.from", verify=False)
    except (HFFormatError, ReshardError) as e:
        raise ConfigError(f"init.from: {e}") from None
    bad = damaged(Path(src.source)) if src.step is not None else []  # a checkpoint's
    if bad:
        raise ConfigError(f"init.from: {src.source} is damaged: {'; '.join(bad)}")
    # the shapes and the math: init_std is how a run starts, and an export writes its padded
    # vocabulary as rows (a Hugging Face config.json knows no other), not as the tokenizer's
    # count and the multiple it was padded to: the rows are what must agree
    theirs = model_section(to_dict(src.model), "init.from")
    ours = model_section(to_dict(cfg), "model")
    diff = [k for k, v in ours.items() if theirs.get(k) != v and k not in
            ("init_std", "pad_vocab_to_multiple_of", "vocab_size")]
    if padded_vocab_size(src.model.vocab_size, src.model.pad_vocab_to_multiple_of) != \
            padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of):
        diff.append("vocab_size")
    if diff:
        raise ConfigError(f"init.from: {src.source} is a model of another shape ("
                          + ", ".join(f"model.{k}: {theirs.get(k)} there, {ours.get(k)} here"
                                      for k in diff) + ")")
    if src.tokenizer_sha256() != tokenizer_sha256:
        raise ConfigError(f"init.from: {src.source} was trained with another tokenizer than the "
                          f"run's data ({src.tokenizer}): its ids would mean other tokens "
                          f"(prepare the data with --tokenizer {src.source})")
    copy_weights(model, src, "init.from", lambda name, full: shard(name, full, tp_rank, tp))
    return src
