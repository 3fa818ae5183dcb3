"""Our full weights <-> the public LLaDA Hugging Face layout (``LLaDAModelLM``, as released in
GSAI-ML/LLaDA-8B-Base: ``modeling_llada.py`` / ``configuration_llada.py``).

``llada export`` writes a directory that people load with their own tooling, and
``init.from=HF_DIR`` starts training from one. Both sides are the same model:

* Our names are the global piece indices of ``framework/model/model.py`` (``0.word_embeddings``,
  ``{i+1}.layer...`` for layer i, ``{L+1}.final_layernorm`` / ``{L+1}.output_layer``); the
  release nests everything under ``model.transformer`` (``LLaDAModelLM.model`` is an
  ``LLaDAModel`` whose ``transformer`` ModuleDict holds ``wte``, ``blocks.{i}``, ``ln_f``,
  ``ff_out``), ``block_type: llama`` (``LLaDALlamaBlock``).
* megatron's fused ``linear_qkv`` is laid out per query group (megatron-core
  ``SelfAttention.get_query_key_value_tensors``): for each kv group g the rows are
  [the q heads of g; k_g; v_g], each head ``head_dim`` rows. The release keeps separate
  ``q_proj`` / ``k_proj`` / ``v_proj`` with heads in order, and its GQA repeats kv head g for
  q heads ``g * q_per_group ...`` (``repeat_interleave``), the same grouping as megatron's.
* Our SwiGLU ``linear_fc1`` is [gate; up] (megatron's ``glu``: ``silu(first half) * second
  half``); the release computes ``act(ff_proj(x)) * up_proj(x)`` with ``activation_type: silu``,
  so ``ff_proj`` is the gate and ``up_proj`` the linear half.
* Both apply RoPE in the rotate-half layout (``cat(freqs, freqs)``, ``cat(-x2, x1)``), so q/k
  rows need no permutation; RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight`` on both sides.
* The vocabulary is padded (``framework/layout.padded_vocab_size``): ``embedding_size`` is the
  padded row count of ``wte`` / ``ff_out``, ``vocab_size`` our ``model.vocab_size`` (the
  release's configuration documents ``embedding_size`` as exactly this padding).

Export files: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above the shard size),
and our SentencePiece ``tokenizer.model`` with ``tokenizer_config.json`` /
``special_tokens_map.json`` naming our special tokens. The release's ``modeling_llada.py`` /
``configuration_llada.py`` are not ours to ship: ``auto_map`` names them as the release does, so
users copy them from GSAI-ML/LLaDA-8B-Base beside the weights (or point ``auto_map`` at it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from framework.config import ModelConfig
from framework.layout import padded_vocab_size

Tensor = torch.Tensor

PREFIX = "model.transformer."
ARCHITECTURE = "LLaDAModelLM"
MODEL_TYPE = "llada"
AUTO_MAP = {  # as in the release's config.json
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")

# our per-layer names (after "{i+1}.layer.") <-> the release's (after "blocks.{i}.") for the
# tensors that map one to one; linear_qkv and linear_fc1 are split below
_LAYER_SAME = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attention.linear_proj.weight": "attn_out.weight",
    "pre_mlp_layernorm.weight": "ff_norm.weight",
    "mlp.linear_fc2.weight": "ff_out.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"

# configuration_llada.ModelConfig's defaults: what a key missing from config.json means there
_HF_DEFAULTS: Dict[str, Any] = {
    "d_model": 768, "n_heads": 12, "n_layers": 12, "n_kv_heads": None,
    "multi_query_attention": None, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1,
    "alibi": False, "rope": False, "attention_layer_norm": False, "input_emb_norm": False,
    "layer_norm_type": "default", "layer_norm_with_affine": True, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "include_qkv_bias": False, "include_bias": False,
    "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257,
    "embedding_size": 50304, "weight_tying": True, "yarn": False,
}


class HFFormatError(ValueError):
    """A Hugging Face directory (or export input) that is not the model we expect. The message
    is one line and names the file and the config key or tensor."""


# ----------------------------------------------------------------------------- names and shapes
def _head_dim(cfg: ModelConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def our_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every full tensor of our model, in module order, with its shape: what ``to_hf`` needs
    and ``from_hf`` returns (the same names as ``named_parameters`` of a one-process model)."""
    h, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, _head_dim(cfg)
    vocab = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * hd
    shapes: Dict[str, Tuple[int, ...]] = {"0.word_embeddings.weight": (vocab, h)}
    for i in range(cfg.num_layers):
        p = f"{i + 1}.layer."
        shapes.update({p + "input_layernorm.weight": (h,),
                       p + "self_attention.linear_proj.weight": (h, h),
                       p + _QKV: (qkv_rows, h),
                       p + "pre_mlp_layernorm.weight": (h,),
                       p + _FC1: (2 * f, h),
                       p + "mlp.linear_fc2.weight": (h, f)})
    head = f"{cfg.num_layers + 1}."
    shapes.update({head + "final_layernorm.weight": (h,), head + "output_layer.weight": (vocab, h)})
    return shapes


def hf_shapes(cfg: ModelConfig, weight_tying: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the release's layout for ``cfg``, in ``LLaDAModelLM.state_dict()`` order
    (wte, ln_f, blocks, ff_out), with its shape."""
    h, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, _head_dim(cfg)
    vocab = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
    shapes: Dict[str, Tuple[int, ...]] = {PREFIX + "wte.weight": (vocab, h),
                                          PREFIX + "ln_f.weight": (h,)}
    for i in range(cfg.num_layers):
        b = f"{PREFIX}blocks.{i}."
        shapes.update({b + "attn_out.weight": (h, h), b + "ff_out.weight": (h, f),
                       b + "attn_norm.weight": (h,), b + "ff_norm.weight": (h,),
                       b + "q_proj.weight": (cfg.num_attention_heads * hd, h),
                       b + "k_proj.weight": (cfg.num_kv_heads * hd, h),
                       b + "v_proj.weight": (cfg.num_kv_heads * hd, h),
                       b + "ff_proj.weight": (f, h), b + "up_proj.weight": (f, h)})
    if not weight_tying:
        shapes[PREFIX + "ff_out.weight"] = (vocab, h)
    return shapes


def _check_tensors(got: Mapping[str, Tensor], want: Mapping[str, Tuple[int, ...]], where: str,
                   ignore_suffix: str = "_extra_state") -> None:
    """Exactly the expected names with the expected shapes, else HFFormatError naming one."""
    for name, shape in want.items():
        if name not in got:
            raise HFFormatError(f"{where}: missing tensor {name}")
        if tuple(got[name].shape) != tuple(shape):
            raise HFFormatError(f"{where}: tensor {name} has shape {tuple(got[name].shape)}, "
                                f"expected {tuple(shape)}")
    extra = [n for n in got if n not in want and not n.endswith(ignore_suffix)]
    if extra:
        raise HFFormatError(f"{where}: unexpected tensor {extra[0]}"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


# ----------------------------------------------------------------------------- qkv and fc1
def split_qkv(qkv: Tensor, cfg: ModelConfig) -> Tuple[Tensor, Tensor, Tensor]:
    """megatron's grouped [q_g; k_g; v_g] rows -> q_proj, k_proj, v_proj (heads in order).
    Copies: the parts must not share storage (safetensors refuses shared tensors)."""
    ng, hd = cfg.num_kv_heads, _head_dim(cfg)
    qpg = cfg.num_attention_heads // ng
    grouped = qkv.reshape(ng, qpg + 2, hd, qkv.shape[-1])
    q = grouped[:, :qpg].reshape(ng * qpg * hd, -1).clone()
    k = grouped[:, qpg].reshape(ng * hd, -1).clone()
    v = grouped[:, qpg + 1].reshape(ng * hd, -1).clone()
    return q, k, v


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """q_proj, k_proj, v_proj -> megatron's ``linear_qkv`` (inverse of ``split_qkv``)."""
    ng, hd = cfg.num_kv_heads, _head_dim(cfg)
    qpg = cfg.num_attention_heads // ng
    h = q.shape[-1]
    grouped = torch.cat([q.reshape(ng, qpg, hd, h), k.reshape(ng, 1, hd, h),
                         v.reshape(ng, 1, hd, h)], dim=1)
    return grouped.reshape(ng * (qpg + 2) * hd, h)


# ----------------------------------------------------------------------------- state dicts
def to_hf(weights: Mapping[str, Tensor], cfg: ModelConfig) -> Dict[str, Tensor]:
    """Our full weights -> the release's state dict (``model.transformer...``), same dtype.
    One-to-one tensors are passed through (not copied); qkv and fc1 are split into copies.
    Raises HFFormatError when ``weights`` is not exactly our model for ``cfg``."""
    _check_tensors(weights, our_shapes(cfg), "weights")
    L = cfg.num_layers
    hf: Dict[str, Tensor] = {PREFIX + "wte.weight": weights["0.word_embeddings.weight"],
                             PREFIX + "ln_f.weight": weights[f"{L + 1}.final_layernorm.weight"]}
    for i in range(L):
        ours, b = f"{i + 1}.layer.", f"{PREFIX}blocks.{i}."
        for mine, theirs in _LAYER_SAME.items():
            hf[b + theirs] = weights[ours + mine]
        hf[b + "q_proj.weight"], hf[b + "k_proj.weight"], hf[b + "v_proj.weight"] = \
            split_qkv(weights[ours + _QKV], cfg)
        gate, up = weights[ours + _FC1].chunk(2, dim=0)
        hf[b + "ff_proj.weight"], hf[b + "up_proj.weight"] = gate.clone(), up.clone()
    hf[PREFIX + "ff_out.weight"] = weights[f"{L + 1}.output_layer.weight"]
    return {name: hf[name] for name in hf_shapes(cfg)}  # the release's order


def from_hf(hf: Mapping[str, Tensor], cfg: ModelConfig, weight_tying: bool = False
            ) -> Dict[str, Tensor]:
    """The release's state dict -> our full weights (exact inverse of ``to_hf``; same dtype).
    ``weight_tying``: the checkpoint has no ``ff_out`` (a tied model); our untied head starts
    as a copy of the embedding. Raises HFFormatError on a missing, extra or misshapen tensor."""
    _check_tensors(hf, hf_shapes(cfg, weight_tying), "checkpoint")
    L = cfg.num_layers
    ours: Dict[str, Tensor] = {"0.word_embeddings.weight": hf[PREFIX + "wte.weight"]}
    for i in range(L):
        o, b = f"{i + 1}.layer.", f"{PREFIX}blocks.{i}."
        ours[o + "input_layernorm.weight"] = hf[b + "attn_norm.weight"]
        ours[o + "self_attention.linear_proj.weight"] = hf[b + "attn_out.weight"]
        ours[o + _QKV] = merge_qkv(hf[b + "q_proj.weight"], hf[b + "k_proj.weight"],
                                   hf[b + "v_proj.weight"], cfg)
        ours[o + "pre_mlp_layernorm.weight"] = hf[b + "ff_norm.weight"]
        ours[o + _FC1] = torch.cat([hf[b + "ff_proj.weight"], hf[b + "up_proj.weight"]], dim=0)
        ours[o + "mlp.linear_fc2.weight"] = hf[b + "ff_out.weight"]
    ours[f"{L + 1}.final_layernorm.weight"] = hf[PREFIX + "ln_f.weight"]
    ours[f"{L + 1}.output_layer.weight"] = (hf[PREFIX + "wte.weight"].clone() if weight_tying
                                            else hf[PREFIX + "ff_out.weight"])
    return ours


# ----------------------------------------------------------------------------- config.json
def hf_config(cfg: ModelConfig, vocab_size: int, mask_id: int, *, eos_id: int,
              pad_id: Optional[int] = None, bos_id: Optional[int] = None,
              max_sequence_length: int = 4096, torch_dtype: str = "bfloat16") -> Dict[str, Any]:
    """The release's config.json (same keys as GSAI-ML/LLaDA-8B-Base's) with our values, so its
    ``LLaDAConfig`` / ``LLaDAModelLM`` build exactly our architecture. ``vocab_size``: the
    model's vocabulary (``model.vocab_size``; at least the tokenizer's pieces, as in the release:
    126464 for a tokenizer of fewer); ``embedding_size``: our padded rows. Keys that only steer
    training or initialisation in the release's code (init_*, precision, dropout) say what ours
    are."""
    embedding_size = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
    if not 0 < vocab_size <= embedding_size:
        raise HFFormatError(f"vocab_size: {vocab_size} does not fit the model's {embedding_size} "
                            f"embedding rows")
    if not 0 <= mask_id < vocab_size:
        raise HFFormatError(f"mask_token_id: {mask_id} is outside the vocabulary of {vocab_size}")
    config: Dict[str, Any] = {
        "activation_type": "silu",  # with block_type llama: act(ff_proj(x)) * up_proj(x)
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": [ARCHITECTURE],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": dict(AUTO_MAP),
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": cfg.hidden_size,
        "embedding_dropout": 0.0,
        "embedding_size": embedding_size,
        "eos_token_id": eos_id,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "normal",  # ours: normal(0, init_std), residual projections scaled down
        "init_std": cfg.init_std,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": mask_id,
        "max_sequence_length": max_sequence_length,
        "mlp_hidden_size": cfg.ffn_hidden_size,
        "mlp_ratio": 4,  # unused when mlp_hidden_size is set (the release's value)
        "model_type": MODEL_TYPE,
        "multi_query_attention": None,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_kv_heads,
        "n_layers": cfg.num_layers,
        "pad_token_id": eos_id if pad_id is None else pad_id,  # LLaDA pads with EOS
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": cfg.norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": float(cfg.rope_theta),
        "scale_logits": False,
        "torch_dtype": torch_dtype,
        "use_cache": False,
        "vocab_size": vocab_size,
        "weight_tying": False,
    }
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    return dict(sorted(config.items()))


def _get(config: Mapping[str, Any], key: str) -> Any:
    return config.get(key, _HF_DEFAULTS.get(key))


def check_hf_config(config: Mapping[str, Any], cfg: ModelConfig,
                    where: str = "config.json") -> None:
    """HFFormatError unless ``config`` describes exactly our architecture for ``cfg``: the sizes
    must match, and every switch of the release's code must select the LLaMA block we
    implement (missing keys mean the release's configuration defaults)."""
    def fail(key: str, value: Any, expected: str) -> None:
        raise HFFormatError(f"{where}: {key} is {json.dumps(value)} but {expected}")

    if config.get("model_type") != MODEL_TYPE:
        fail("model_type", config.get("model_type"), f"a LLaDA checkpoint has {MODEL_TYPE!r}")
    d_model = _get(config, "d_model")
    n_heads = _get(config, "n_heads")
    n_kv = _get(config, "n_kv_heads")
    mqa = _get(config, "multi_query_attention")
    if n_kv is None:
        n_kv = 1 if mqa else n_heads
    mlp = _get(config, "mlp_hidden_size")
    ratio = _get(config, "mlp_ratio")
    if mlp is None and isinstance(d_model, int) and isinstance(ratio, int):
        mlp = ratio * d_model
    embedding = _get(config, "embedding_size") or _get(config, "vocab_size")
    padded = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
    sizes = [("n_layers", _get(config, "n_layers"), cfg.num_layers, "model.num_layers"),
             ("d_model", d_model, cfg.hidden_size, "model.hidden_size"),
             ("n_heads", n_heads, cfg.num_attention_heads, "model.num_attention_heads"),
             ("n_kv_heads", n_kv, cfg.num_kv_heads, "model.num_kv_heads"),
             ("mlp_hidden_size", mlp, cfg.ffn_hidden_size, "model.ffn_hidden_size"),
             ("embedding_size", embedding, padded,
              f"the padded vocabulary (model.vocab_size={cfg.vocab_size} rounded up to "
              f"model.pad_vocab_to_multiple_of={cfg.pad_vocab_to_multiple_of})")]
    for key, value, want, ours in sizes:
        if value != want:
            fail(key, value, f"{ours} is {want}")
    for key, want, ours in (("rope_theta", cfg.rope_theta, "model.rope_theta"),
                            ("rms_norm_eps", cfg.norm_eps, "model.norm_eps")):
        value = _get(config, key)
        if not isinstance(value, (int, float)) or not math.isclose(value, want, rel_tol=1e-6):
            fail(key, value, f"{ours} is {want}")
    switches = [("block_type", "llama"), ("activation_type", "silu"), ("layer_norm_type", "rms"),
                ("rope", True), ("alibi", False), ("yarn", False), ("block_group_size", 1),
                ("include_bias", False), ("attention_layer_norm", False),
                ("scale_logits", False), ("input_emb_norm", False),
                ("layer_norm_with_affine", True)]
    for key, want in switches:
        if _get(config, key) != want:
            fail(key, _get(config, key), f"this model needs {json.dumps(want)}")
    for key in ("include_qkv_bias", "bias_for_layer_norm"):  # null means "no" in the release
        if _get(config, key):
            fail(key, _get(config, key), "this model has no biases")
    vocab = _get(config, "vocab_size")
    if not isinstance(vocab, int) or not 0 < vocab <= padded:
        fail("vocab_size", vocab, f"must fit the {padded} embedding rows")


# ----------------------------------------------------------------------------- tokenizer files
def _tokenizer_files(tokenizer_model: Path, special_ids: Mapping[str, Optional[int]],
                     cfg: ModelConfig, max_sequence_length: int) -> Dict[str, Any]:
    """tokenizer_config.json and special_tokens_map.json for our SentencePiece model, loadable
    as transformers' slow ``LlamaTokenizer`` (``AutoTokenizer.from_pretrained(dir,
    use_fast=False)``): ``legacy``, no prefix space of its own, no BOS/EOS added, so it encodes
    and decodes exactly as our pipeline's ``sp.encode`` / ``sp.decode`` (checked against
    transformers 4.46.3). Two caveats: transformers' conversion to a *fast* tokenizer is not
    exact for our model (it restarts the dummy prefix after every user-defined piece such as
    "\\n"), and transformers matches the literal text of a special token (``<|mdm_mask|>``) as
    that token unless ``split_special_tokens=True``, where SentencePiece never produces a control
    id from text. Checks the ids against the model."""
    import sentencepiece as spm

    from data_pipeline.tokenizer import MASK_PIECE, load_tokenizer

    tok = load_tokenizer(Path(tokenizer_model), "tokenizer_model")
    sp: spm.SentencePieceProcessor = tok.sp
    if tok.vocab_size > cfg.vocab_size:  # a larger model vocabulary is fine (ids never reached)
        raise HFFormatError(f"tokenizer.model: {tok.vocab_size} pieces but model.vocab_size is "
                            f"only {cfg.vocab_size}")
    if special_ids.get("mask") != tok.mask_id:
        raise HFFormatError(f"special_ids: mask is {special_ids.get('mask')} but "
                            f"{tokenizer_model} has {MASK_PIECE} at {tok.mask_id}")
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
        "legacy": True,  # plain sp.encode, as data_pipeline/tokenizer.py does
        "add_prefix_space": False,  # else decode strips a leading space twice (sp does it once)
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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_hf_dir(out_dir: Path, weights: Mapping[str, Tensor], cfg: ModelConfig,
                 tokenizer_model: Path, special_ids: Mapping[str, Optional[int]],
                 dtype: torch.dtype = torch.bfloat16, *, max_sequence_length: int = 4096,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write our full weights as a directory in the release's layout (see module docstring).
    Atomic: everything goes to a temporary sibling directory that is renamed into place at the
    end, so a failed export leaves nothing at ``out_dir`` (with ``overwrite``, an existing
    ``out_dir`` is replaced only once the new one is complete). ``special_ids``: the manifest's
    (mask, eos, pad, bos, unk, chat tokens; None where absent). Returns ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite to replace it)")
    if special_ids.get("mask") is None or special_ids.get("eos") is None:
        raise HFFormatError("special_ids: mask and eos are required")
    hf = to_hf(weights, cfg)  # checks names and shapes before anything is written
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tok_files = _tokenizer_files(Path(tokenizer_model), special_ids, cfg, max_sequence_length)
        shards = _shards(hf, dtype, max_shard_bytes)
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map: Dict[str, str] = {}
        total = 0
        for fname, keys in zip(names, shards):
            part = {k: hf[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in keys}
            save_file(part, str(tmp / fname), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in part.values())
            weight_map.update({k: fname for k in keys})
            del part
        if len(shards) > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total},
                                           "weight_map": weight_map})
        _write_json(tmp / "config.json", hf_config(
            cfg, cfg.vocab_size, special_ids["mask"], eos_id=special_ids["eos"],
            pad_id=special_ids.get("pad"), bos_id=special_ids.get("bos"),
            max_sequence_length=max_sequence_length, torch_dtype=_dtype_name(dtype)))
        pad = special_ids.get("pad")
        generation = {"_from_model_config": True, "eos_token_id": special_ids["eos"],
                      "pad_token_id": special_ids["eos"] if pad is None else pad}
        if special_ids.get("bos") is not None:
            generation["bos_token_id"] = special_ids["bos"]
        _write_json(tmp / "generation_config.json", dict(sorted(generation.items())))
        shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        for fname, obj in tok_files.items():
            _write_json(tmp / fname, obj)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
def read_hf_config(hf_dir: Path) -> Dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{path}: file not found")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{path}: not JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(config, dict):
        raise HFFormatError(f"{path}: not a JSON object")
    return config


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
        raise HFFormatError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}")
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
    config = read_hf_config(hf_dir)
    check_hf_config(config, cfg)
    tied = bool(_get(config, "weight_tying"))
    tensors = _read_tensors(hf_dir)
    where = SINGLE_FILE if not (hf_dir / INDEX_FILE).is_file() else "safetensors shards"
    _check_tensors(tensors, hf_shapes(cfg, tied), where)
    return from_hf(tensors, cfg, weight_tying=tied)
