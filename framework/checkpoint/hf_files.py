"""Hugging Face LLaDA directories on disk: ``llada export`` writes one from a checkpoint, and
``init.from`` reads one into a fresh run. The name and shape mapping and config.json are
hf_mapping.py's.

Export files: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above the shard size),
and our SentencePiece ``tokenizer.model`` with ``tokenizer_config.json`` /
``special_tokens_map.json`` naming our special tokens. The release's ``modeling_llada.py`` /
``configuration_llada.py`` are not ours to ship: ``auto_map`` names them as the release does, so
users copy them from GSAI-ML/LLaDA-8B-Base beside the weights (or point ``auto_map`` at it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from framework.checkpoint.checkpointer import read_meta, resolve_checkpoint
from framework.checkpoint.files import checkpoint_tokenizer
from framework.checkpoint.hf_mapping import (OBJECTIVE_KEY, HFFormatError, check_hf_config,
                                             check_tensors,
                                             config_value, from_hf, hf_config, hf_shapes, to_hf)
from framework.checkpoint.reshard import Layout, read_weights
from framework.config import ModelConfig, from_data
from framework.hf_config import read_config_json

Tensor = torch.Tensor
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


# ----------------------------------------------------------------------------- tokenizer files
def _tokenizer_files(tok, special_ids: Mapping[str, Optional[int]],
                     cfg: ModelConfig, max_sequence_length: int) -> Dict[str, Any]:
    """tokenizer_config.json and special_tokens_map.json for our SentencePiece model, loadable
    as transformers' ``LlamaTokenizer`` (``AutoTokenizer.from_pretrained(dir)``, transformers 5:
    converted to a ``tokenizers`` BPE with byte fallback): ``legacy: false`` with
    ``add_prefix_space`` (a Metaspace pre-tokenizer that prepends the dummy prefix to the text's
    first piece only, as SentencePiece does, not after every added token), no BOS/EOS added. It
    then encodes as our pipeline's ``sp.encode`` (checked on the embedded corpus: every document
    the same ids except one that starts with a space, whose leading spaces BPE merges in another
    order) and decodes as ``sp.decode``. transformers matches the literal text of a special token
    (``<|mdm_mask|>``) as that token unless ``split_special_tokens=True``, where SentencePiece
    never produces a control id from text. ``tok``: the loaded SentencePiece tokenizer. Checks
    the ids against the model."""
    import sentencepiece as spm

    from data_pipeline.tokenizer import MASK_PIECE

    sp: spm.SentencePieceProcessor = tok.sp
    if tok.vocab_size > cfg.vocab_size:  # a larger model vocabulary is fine (ids never reached)
        raise HFFormatError(f"tokenizer.model: {tok.vocab_size} pieces but model.vocab_size is "
                            f"only {cfg.vocab_size}")
    if special_ids.get("mask") != tok.mask_id:
        raise HFFormatError(f"special_ids: mask is {special_ids.get('mask')} but "
                            f"{tok.path} has {MASK_PIECE} at {tok.mask_id}")
    pieces: Dict[str, str] = {}
    for name, i in special_ids.items():
        if i is None:
            continue
        if not 0 <= i < tok.vocab_size:
            raise HFFormatError(f"special_ids: {name} is {i}, outside the tokenizer's "
                                f"{tok.vocab_size} pieces")
        pieces[name] = sp.id_to_piece(i)
    roles = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token",
             "mask": "mask_token"}
    named = {role: pieces[k] for k, role in roles.items() if k in pieces}
    extra = sorted({p for k, p in pieces.items() if k not in roles} - set(named.values()),
                   key=sp.piece_to_id)
    special_map: Dict[str, Any] = {**named, "additional_special_tokens": extra}
    added = {str(sp.piece_to_id(p)): {"content": p, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": True}
             for p in sorted(set(pieces.values()), key=sp.piece_to_id)}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,  # our pipeline adds no BOS/EOS when encoding
        "add_eos_token": False,
        "legacy": False,  # the dummy prefix before the text's first piece only
        "add_prefix_space": True,  # SentencePiece's add_dummy_prefix (and decode strips it)
        "added_tokens_decoder": added,
        **special_map,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_sequence_length,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "use_default_system_prompt": False,
    }
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_map}


# ----------------------------------------------------------------------------- writing
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shards(hf: Mapping[str, Tensor], dtype: torch.dtype, max_shard_bytes: int
            ) -> List[List[str]]:
    """Tensor names per shard, in order, each shard at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own), as transformers' ``save_pretrained`` splits."""
    size = torch.tensor([], dtype=dtype).element_size()
    shards: List[List[str]] = [[]]
    used = 0
    for name, t in hf.items():
        nbytes = t.numel() * size
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_hf_dir(out_dir: Path, weights: Mapping[str, Tensor], cfg: ModelConfig,
                 tokenizer_model: Path, special_ids: Mapping[str, Optional[int]],
                 dtype: torch.dtype = torch.bfloat16, *, max_sequence_length: int = 4096,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 objective: str = "pretrain", logit_shift: bool = False) -> Path:
    """Write our full weights as a Hugging Face directory: the LLaDA release's layout (see
    module docstring), or for an autoregressive baseline (``objective`` ar) a standard
    Llama/Qwen2/Qwen3 causal LM (hf_causal.py) that transformers loads without remote code.
    A diffusion model the release's layout cannot express (``release_layout``) takes its causal
    LM's layout too, with ``llada_objective`` saying what it is. Atomic: everything goes to a
    temporary sibling directory that is renamed into place at the
    end, so a failed export leaves nothing at ``out_dir`` (with ``overwrite``, an existing
    ``out_dir`` is replaced only once the new one is complete). ``special_ids``: the manifest's
    (mask, eos, pad, bos, unk, chat tokens; None where absent). ``logit_shift``: the model
    predicts position i's token at position i - 1 (``objective.logit_shift``), recorded as
    ``llada_logit_shift``. Returns ``out_dir``."""
    from framework.checkpoint.hf_causal import causal_config, to_causal

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite to replace it)")
    if special_ids.get("mask") is None or special_ids.get("eos") is None:
        raise HFFormatError("special_ids: mask and eos are required")
    eos, pad, bos = special_ids["eos"], special_ids.get("pad"), special_ids.get("bos")
    # names and shapes checked before anything is written
    if objective == "ar" or not release_layout(cfg):
        hf = to_causal(weights, cfg)
        config = causal_config(cfg, eos_id=eos, bos_id=bos, pad_id=pad,
                               max_position_embeddings=max_sequence_length,
                               dtype=_dtype_name(dtype))
        if objective != "ar":  # a diffusion model in a causal LM's layout: ours to run
            config = dict(sorted({**config, OBJECTIVE_KEY: objective,
                                  SHIFT_KEY: logit_shift}.items()))
    else:
        hf = to_hf(weights, cfg)
        config = hf_config(cfg, cfg.vocab_size, special_ids["mask"], eos_id=eos, pad_id=pad,
                           bos_id=bos, max_sequence_length=max_sequence_length,
                           torch_dtype=_dtype_name(dtype), objective=objective)
        if logit_shift:
            config = dict(sorted({**config, SHIFT_KEY: True}.items()))
    generation = {"_from_model_config": True, "eos_token_id": eos,
                  "pad_token_id": eos if pad is None else pad}
    if bos is not None:
        generation["bos_token_id"] = bos
    files = {"config.json": _json_bytes(config),
             "generation_config.json": _json_bytes(dict(sorted(generation.items()))),
             **_tokenizer_export(Path(tokenizer_model), special_ids, cfg, max_sequence_length)}
    _write_dir(out_dir, hf, files, dtype, max_shard_bytes)
    return out_dir


SHIFT_KEY = "llada_logit_shift"  # ours, in an export's config.json: Dream's shifted logits


def release_layout(cfg: ModelConfig) -> bool:
    """Whether the LLaDA release's layout expresses the model: it has no QKV biases, QK norms,
    head dimension of its own or RoPE scaling (a diffusion model adapted from a Qwen or Llama
    3.1 has them, and exports in its causal LM's layout with ``llada_objective``)."""
    return not (cfg.qkv_bias or cfg.qk_norm or cfg.rope_scaling.type != "none"
                or cfg.kv_channels * cfg.num_attention_heads != cfg.hidden_size)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _tokenizer_export(tokenizer: Path, special_ids: Mapping[str, Optional[int]],
                      cfg: ModelConfig, max_sequence_length: int) -> Dict[str, bytes]:
    """The tokenizer's files in an export: our SentencePiece model with the configuration that
    transformers loads it by; a Hugging Face tokenizer's own files (data_pipeline/tokenizer.py),
    and the file we carry it as, so that init.from of the export finds the same tokenizer."""
    from data_pipeline.tokenizer import SP_FILE, load_tokenizer

    tok = load_tokenizer(tokenizer, "tokenizer")
    if tok.file_name != SP_FILE:
        return {tok.file_name: tok.data(), **{name: text.encode() if isinstance(text, str)
                                              else text for name, text in tok.hf_files().items()}}
    files = {SP_FILE: tok.data()}
    for name, obj in _tokenizer_files(tok, special_ids, cfg, max_sequence_length).items():
        files[name] = _json_bytes(obj)
    return files


def _write_dir(out_dir: Path, hf: Mapping[str, Tensor], files: Mapping[str, bytes],
               dtype: torch.dtype, max_shard_bytes: int) -> None:
    """The safetensors of ``hf`` (one file, or shards with an index) and ``files`` in a
    temporary sibling directory, renamed to ``out_dir`` once complete."""
    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        shards = _shards(hf, dtype, max_shard_bytes)
        n = len(shards)
        names = ([SINGLE_FILE] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map: Dict[str, str] = {}
        total = 0
        for fname, keys in zip(names, shards):
            part = {k: hf[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in keys}
            save_file(part, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in part.values())
            weight_map.update({k: fname for k in keys})
            del part
        if len(shards) > 1:
            (tmp / INDEX_FILE).write_bytes(_json_bytes({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}))
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temporary directory to ``out_dir``; an existing one is moved aside
    first and removed only after the rename succeeded."""
    for f in tmp.iterdir():  # the files' bytes on disk before the directory appears
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading
def _read_tensors(hf_dir: Path) -> Dict[str, Tensor]:
    """Every tensor of the directory's safetensors (one file, or the shards of the index),
    as float32 on the CPU."""
    from safetensors import SafetensorError, safe_open

    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise HFFormatError(f"{index}: no weight_map") from None
    elif (hf_dir / SINGLE_FILE).is_file():
        weight_map = None
    else:
        pickled = [p.name for p in hf_dir.glob("pytorch_model*.bin")]
        raise HFFormatError(f"{hf_dir}: no weights: neither {SINGLE_FILE} nor {INDEX_FILE}"
                            + (f" ({pickled[0]} is not read: save it as safetensors)"
                               if pickled else ""))
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    tensors: Dict[str, Tensor] = {}
    for fname in files:
        path = hf_dir / fname
        if not path.is_file():
            raise HFFormatError(f"{INDEX_FILE}: names {fname}, which is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if weight_map is not None and weight_map.get(key) != fname:
                        continue  # the index says where each tensor lives
                    tensors[key] = f.get_tensor(key).float()
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"{fname}: not a safetensors file "
                                f"({' '.join(str(e).split())[:120]})") from None
    if weight_map is not None:
        missing = [k for k, v in weight_map.items() if k not in tensors]
        if missing:
            raise HFFormatError(f"{weight_map[missing[0]]}: missing tensor {missing[0]} "
                                f"(named in {INDEX_FILE})")
    return tensors


def read_hf_dir(hf_dir: Path, cfg: ModelConfig) -> Dict[str, Tensor]:
    """A directory in the release's layout -> our full weights in float32, after checking that
    its config.json describes ``cfg`` and that every tensor is there with the right shape
    (HFFormatError otherwise, naming the config key, file or tensor). A tied checkpoint
    (``weight_tying: true``) gives an untied head that starts as the embedding."""
    hf_dir = Path(hf_dir)
    config = read_config_json(hf_dir)
    check_hf_config(config, cfg)
    tied = bool(config_value(config, "weight_tying"))
    tensors = _read_tensors(hf_dir)
    where = SINGLE_FILE if not (hf_dir / INDEX_FILE).is_file() else "safetensors shards"
    check_tensors(tensors, hf_shapes(cfg, tied), where)
    return from_hf(tensors, cfg, weight_tying=tied)


def read_causal_dir(hf_dir: Path) -> tuple:
    """A Hugging Face Llama/Qwen2/Qwen3 directory -> (our full weights in float32, its
    ModelConfig, its config.json); HFFormatError naming the config key, file or tensor."""
    from framework.checkpoint.hf_causal import from_causal, model_config_from_causal
    from framework.hf_config import is_tied

    hf_dir = Path(hf_dir)
    config = read_config_json(hf_dir)
    cfg = model_config_from_causal(config, str(hf_dir / "config.json"))
    tensors = _read_tensors(hf_dir)
    return from_causal(tensors, cfg, tied=is_tied(config)), cfg, config


def open_checkpoint(source: Path, warn=print, key: str = "CHECKPOINT",
                    verify: bool = True) -> tuple:
    """(the checkpoint, its meta.json, its ModelConfig) named by a step_N directory, a
    checkpoints directory or a run directory (their newest complete checkpoint)."""
    source = Path(source)
    if (source / "checkpoints").is_dir():  # a run directory
        source = source / "checkpoints"
    tag = resolve_checkpoint(source, warn, key, verify=verify)
    meta = read_meta(tag)
    model = from_data(ModelConfig, meta["config"]["model"],
                      key=f"{tag}: its model config does not fit this version's")
    return tag, meta, model


def export_checkpoint(source: Path, out_dir: Path, dtype: torch.dtype, overwrite: bool = False,
                      warn=print) -> tuple:
    """``llada export``: a checkpoint (a step_N directory, a checkpoints directory or a run
    directory: its newest complete checkpoint) of any layout as a Hugging Face directory.
    Returns (the checkpoint, its meta.json)."""
    tag, meta, model = open_checkpoint(source, warn)
    weights = read_weights(tag, Layout.saved(meta["layout"]))
    write_hf_dir(out_dir, weights, model, checkpoint_tokenizer(tag), meta["special_ids"],
                 dtype=dtype, max_sequence_length=meta["config"]["data"]["seq_len"],
                 overwrite=overwrite, objective=checkpoint_objective(meta),
                 logit_shift=checkpoint_shift(meta))
    return tag, meta


def checkpoint_objective(meta: Mapping[str, Any]) -> str:
    """The objective a checkpoint was trained with (checkpoints from before there was a choice:
    pretraining)."""
    return meta["config"].get("objective", {}).get("kind", "pretrain")


def checkpoint_shift(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's model reads position i's prediction at i - 1 (Dream's shift)."""
    return bool(meta["config"].get("objective", {}).get("logit_shift", False))
