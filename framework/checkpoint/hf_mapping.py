"""Our full weights <-> the public LLaDA Hugging Face layout (``LLaDAModelLM``, as released in
GSAI-ML/LLaDA-8B-Base: ``modeling_llada.py`` / ``configuration_llada.py``): tensor names and
shapes, and config.json. The files themselves are written and read by hf_files.py.

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
* The vocabulary is padded (``framework/model/params.padded_vocab_size``): ``embedding_size`` is the
  padded row count of ``wte`` / ``ff_out``, ``vocab_size`` our ``model.vocab_size`` (the
  release's configuration documents ``embedding_size`` as exactly this padding).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from framework.config import ModelConfig
from framework.hf_config import HFFormatError
from framework.model.params import full_shapes, head_dim, padded_vocab_size

Tensor = torch.Tensor

PREFIX = "model.transformer."
ARCHITECTURE = "LLaDAModelLM"
MODEL_TYPE = "llada"
AUTO_MAP = {  # as in the release's config.json
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}

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



# ----------------------------------------------------------------------------- names and shapes
def hf_shapes(cfg: ModelConfig, weight_tying: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the release's layout for ``cfg``, in ``LLaDAModelLM.state_dict()`` order
    (wte, ln_f, blocks, ff_out), with its shape."""
    h, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, head_dim(cfg)
    vocab = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
    shapes: Dict[str, Tuple[int, ...]] = {PREFIX + "wte.weight": (vocab, h),
                                          PREFIX + "ln_f.weight": (h,)}
    for i in range(cfg.num_layers):
        b = f"{PREFIX}blocks.{i}."
        shapes.update({b + "attn_out.weight": (h, cfg.num_attention_heads * hd),
                       b + "ff_out.weight": (h, f),
                       b + "attn_norm.weight": (h,), b + "ff_norm.weight": (h,),
                       b + "q_proj.weight": (cfg.num_attention_heads * hd, h),
                       b + "k_proj.weight": (cfg.num_kv_heads * hd, h),
                       b + "v_proj.weight": (cfg.num_kv_heads * hd, h),
                       b + "ff_proj.weight": (f, h), b + "up_proj.weight": (f, h)})
    if not weight_tying:
        shapes[PREFIX + "ff_out.weight"] = (vocab, h)
    return shapes


def check_tensors(got: Mapping[str, Tensor], want: Mapping[str, Tuple[int, ...]], where: str,
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
    ng, hd = cfg.num_kv_heads, head_dim(cfg)
    qpg = cfg.num_attention_heads // ng
    grouped = qkv.reshape(ng, qpg + 2, hd, qkv.shape[-1])
    q = grouped[:, :qpg].reshape(ng * qpg * hd, -1).clone()
    k = grouped[:, qpg].reshape(ng * hd, -1).clone()
    v = grouped[:, qpg + 1].reshape(ng * hd, -1).clone()
    return q, k, v


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """q_proj, k_proj, v_proj -> megatron's ``linear_qkv`` (inverse of ``split_qkv``)."""
    ng, hd = cfg.num_kv_heads, head_dim(cfg)
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
    check_tensors(weights, full_shapes(cfg), "weights")
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
    check_tensors(hf, hf_shapes(cfg, weight_tying), "checkpoint")
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
              max_sequence_length: int = 4096, torch_dtype: str = "bfloat16",
              objective: str = "pretrain") -> Dict[str, Any]:
    """The release's config.json (same keys as GSAI-ML/LLaDA-8B-Base's) with our values, so its
    ``LLaDAConfig`` / ``LLaDAModelLM`` build exactly our architecture. ``vocab_size``: the
    model's vocabulary (``model.vocab_size``; at least the tokenizer's pieces, as in the release:
    126464 for a tokenizer of fewer); ``embedding_size``: our padded rows. Keys that only steer
    training or initialisation in the release's code (init_*, precision, dropout) say what ours
    are. ``objective``: what trained it, under our own key ``llada_objective`` (the release's code
    ignores it and always attends bidirectionally: an autoregressive baseline is ours to run)."""
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
        OBJECTIVE_KEY: objective,
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


OBJECTIVE_KEY = "llada_objective"  # ours, in config.json: pretrain | sft | ar (absent: pretrain)


def config_value(config: Mapping[str, Any], key: str) -> Any:
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
    d_model = config_value(config, "d_model")
    n_heads = config_value(config, "n_heads")
    n_kv = config_value(config, "n_kv_heads")
    mqa = config_value(config, "multi_query_attention")
    if n_kv is None:
        n_kv = 1 if mqa else n_heads
    mlp = config_value(config, "mlp_hidden_size")
    ratio = config_value(config, "mlp_ratio")
    if mlp is None and isinstance(d_model, int) and isinstance(ratio, int):
        mlp = ratio * d_model
    embedding = config_value(config, "embedding_size") or config_value(config, "vocab_size")
    padded = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of)
    sizes = [("n_layers", config_value(config, "n_layers"), cfg.num_layers, "model.num_layers"),
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
        value = config_value(config, key)
        if not isinstance(value, (int, float)) or not math.isclose(value, want, rel_tol=1e-6):
            fail(key, value, f"{ours} is {want}")
    switches = [("block_type", "llama"), ("activation_type", "silu"), ("layer_norm_type", "rms"),
                ("rope", True), ("alibi", False), ("yarn", False), ("block_group_size", 1),
                ("include_bias", False), ("attention_layer_norm", False),
                ("scale_logits", False), ("input_emb_norm", False),
                ("layer_norm_with_affine", True)]
    for key, want in switches:
        if config_value(config, key) != want:
            fail(key, config_value(config, key), f"this model needs {json.dumps(want)}")
    for key in ("include_qkv_bias", "bias_for_layer_norm"):  # null means "no" in the release
        if config_value(config, key):
            fail(key, config_value(config, key), "this model has no biases")
    vocab = config_value(config, "vocab_size")
    if not isinstance(vocab, int) or not 0 < vocab <= padded:
        fail("vocab_size", vocab, f"must fit the {padded} embedding rows")




def model_config_from_hf(config: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    """The ModelConfig a release-layout config.json describes (the inverse of ``hf_config``;
    the vocabulary padding is the config's embedding rows themselves), checked by
    ``check_hf_config``. HFFormatError naming the key otherwise."""
    def size(key: str) -> int:
        value = config_value(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise HFFormatError(f"{where}: {key} is {json.dumps(value)}, not a positive integer")
        return value

    if config.get("model_type") != MODEL_TYPE:
        raise HFFormatError(f"{where}: model_type is {json.dumps(config.get('model_type'))} but "
                            f"a LLaDA checkpoint has {MODEL_TYPE!r}")
    d_model, heads = size("d_model"), size("n_heads")
    mqa = config_value(config, "multi_query_attention")
    kv = config_value(config, "n_kv_heads") or (1 if mqa else heads)
    mlp = config_value(config, "mlp_hidden_size") or size("mlp_ratio") * d_model
    vocab = size("vocab_size")
    embedding = config_value(config, "embedding_size") or vocab
    try:
        cfg = ModelConfig(num_layers=size("n_layers"), hidden_size=d_model,
                          num_attention_heads=heads, num_kv_heads=kv, ffn_hidden_size=mlp,
                          vocab_size=vocab, pad_vocab_to_multiple_of=embedding,
                          rope_theta=float(config_value(config, "rope_theta")),
                          norm_eps=float(config_value(config, "rms_norm_eps")))
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{where}: {e}") from None
    check_hf_config(config, cfg, where)
    return cfg
