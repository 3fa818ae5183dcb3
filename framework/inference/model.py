"""A trained model, loaded for inference: one process, CPU (fp32) or one GPU (bf16), the
training model's own definition (framework/model/), its tokenizer and special ids.

MODEL is a checkpoint of any layout (a run directory, its ``checkpoints/`` or a ``step_N``
directory: its full weights through resharding's full-tensor reader) or an ``llada export``
directory (config.json + safetensors + tokenizer.model). A batch of token sequences of different
lengths is left-padded: the pad positions are attended by nobody (``Attend.key_mask``) and, RoPE
being relative, a padded row gives the logits the row alone would, up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from data_pipeline.tokenizer import Tokenizer, load_tokenizer
from framework.config import ConfigError, ModelConfig, ParallelConfig
from framework.model.attention import Attend
from framework.model.model import LLaDAModel, build_model, transformer_config

EXPORT_CONFIG = "config.json"


@dataclass
class InferenceModel:
    model: LLaDAModel
    cfg: ModelConfig
    tokenizer: Tokenizer
    special: Dict[str, Optional[int]]  # mask, eos, bos, eot, ... (None where absent)
    max_length: int  # the sequence length it was trained at: prompt + generation must fit
    device: torch.device
    dtype: torch.dtype
    source: str  # what was loaded: the checkpoint's step_N directory or the export directory
    step: Optional[int] = None  # the checkpoint's step (None for an export)

    @property
    def mask_id(self) -> int:
        return self.special["mask"]

    @property
    def stop_ids(self) -> List[int]:
        """Tokens that end a completion: EOS and, for chat models, <|eot_id|>."""
        return [i for i in (self.special.get("eos"), self.special.get("eot")) if i is not None]

    def document_start(self) -> List[int]:
        """What precedes a prompt: pretraining joins documents with EOS, so a document's text
        follows an EOS (a chat prompt starts with its own BOS instead: data_pipeline/sft.py)."""
        return [self.special["eos"]]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, select: torch.Tensor,
               attend: Optional[Attend] = None) -> torch.Tensor:
        """float32 logits [N, vocab] at the selected positions (the padded vocabulary's extra
        rows dropped: no token has them)."""
        out = self.model(ids.to(self.device), select=select.to(self.device), attend=attend)
        return out[:, :self.tokenizer.vocab_size].float()

    def pad_left(self, rows: Sequence[Sequence[int]], pad_to: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ids [b, S], key_mask [b, S]) of rows left-padded to S = ``pad_to`` or the longest;
        pad positions hold EOS (never the mask) and are False in the key mask."""
        width = pad_to or max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.special["eos"], dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            real[i, width - len(r):] = True
        return ids.to(self.device), real.to(self.device)


def is_export_dir(path: Path) -> bool:
    return (Path(path) / EXPORT_CONFIG).is_file() and not (Path(path) / "meta.json").is_file()


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load(path, device: str = "auto", dtype: Optional[torch.dtype] = None,
         warn=print, key: str = "MODEL") -> InferenceModel:
    """The model at ``path`` (a checkpoint or an export directory, see the module docstring).
    ConfigError naming ``key`` when it is neither; the readers' own errors (HFFormatError,
    ReshardError) for damaged ones."""
    from framework.checkpoint.files import TOKENIZER
    from framework.checkpoint.hf_files import open_checkpoint, read_hf_config, read_hf_dir
    from framework.checkpoint.hf_mapping import config_value, model_config_from_hf
    from framework.checkpoint.reshard import Layout, read_weights
    from framework.parallel.world import init_world

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if is_export_dir(path):
        config = read_hf_config(path)
        cfg = model_config_from_hf(config, f"{path / EXPORT_CONFIG}")
        weights = read_hf_dir(path, cfg)
        tokenizer = load_tokenizer(path / "tokenizer.model", f"{key}: {path}")
        max_length = int(config_value(config, "max_sequence_length") or 4096)
        source, step = str(path), None
    else:
        try:
            tag, meta, cfg = open_checkpoint(path, warn, key)
        except ConfigError as e:
            if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
                raise  # a checkpoint, but a damaged or incomplete one: its own message
            raise ConfigError(f"{e}; {path} is neither a checkpoint (a run directory, its "
                              f"checkpoints/ or a step_N directory) nor an llada export "
                              f"directory ({EXPORT_CONFIG} and safetensors)") from None
        weights = read_weights(tag, Layout.saved(meta["layout"]))
        tokenizer = load_tokenizer(tag / TOKENIZER, f"{key}: {tag}")
        max_length = int(meta["config"]["data"]["seq_len"])
        source, step = str(tag), int(meta["step"])
    world = init_world(ParallelConfig(), device)  # megatron's layers need its (1-way) groups
    dtype = dtype or default_dtype(world.device)
    model = build_model(cfg, transformer_config(cfg, tensor_parallel=1, params_dtype=dtype,
                                                on_cpu=world.device.type == "cpu"))
    model = model.to(world.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in weights or weights[name].shape != p.shape:
                raise ConfigError(f"{key}: {source}: parameter {name} is missing or of another "
                                  "shape")
            p.copy_(weights[name])
    model.eval()
    return InferenceModel(model, cfg, tokenizer, tokenizer.special_ids(), max_length,
                          world.device, dtype, source, step)
