"""Hugging Face causal LMs (Llama, Qwen2, Qwen3) <-> our model: config.json and tensor names.

``init.from`` and ``model.from_hf`` read such a directory (an autoregressive model to adapt to
diffusion, as Dream, DiffuLLaMA and most diffusion LMs since LLaDA were made); ``llada export`` of
an autoregressive baseline (``objective.kind=ar``) writes one, which ``transformers`` loads with
``AutoModelForCausalLM`` and no remote code. The files themselves: hf_files.py.

The three architectures are our layer with options (framework/config/schema.py ModelConfig):

* Llama: RMSNorm, SwiGLU, RoPE (``rope_parameters`` / ``rope_scaling``: default, linear, llama3),
  grouped-query attention, no biases; ``head_dim`` may differ from hidden / heads.
* Qwen2: biases on q/k/v (``model.qkv_bias``), none on the output projection.
* Qwen3: an RMSNorm over each query and key head before RoPE (``model.qk_norm``), its own
  ``head_dim``.

``tie_word_embeddings``: our head is never tied (pipeline stages hold the embedding and the head
apart); a tied checkpoint's head starts as a copy of its embedding, the same function at step 0.
Name mapping: ``model.layers.{i}.`` <-> ``{i+1}.layer.``; q/k/v (weights and biases) join into
megatron's grouped ``linear_qkv`` and gate/up into ``linear_fc1`` as for the LLaDA release
(hf_mapping.py); both sides apply RoPE in the rotate-half layout, so no row permutation.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from framework.config import ModelConfig, RopeScalingConfig
from framework.checkpoint.hf_mapping import check_tensors, merge_qkv, split_qkv
from framework.hf_config import ARCHITECTURES, HFFormatError, model_fields
from framework.model.params import full_shapes, padded_vocab_size

Tensor = torch.Tensor

# per layer: ours (after "{i+1}.layer.") <-> theirs (after "model.layers.{i}.")
_LAYER_SAME = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def architecture(cfg: ModelConfig) -> str:
    """The Hugging Face architecture (model_type) our model for ``cfg`` is."""
    if cfg.qkv_bias and cfg.qk_norm:
        raise HFFormatError("model: QKV biases and QK norms together are none of Llama, Qwen2 "
                            "and Qwen3")
    return "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"


# ----------------------------------------------------------------------------- config.json
def model_config_from_causal(config: Mapping[str, Any], where: str = "config.json"
                             ) -> ModelConfig:
    """The ModelConfig a Llama/Qwen2/Qwen3 config.json describes (framework/hf_config.py);
    HFFormatError naming the key otherwise."""
    fields = model_fields(config, where)
    try:
        return ModelConfig(**{**fields, "rope_scaling": RopeScalingConfig(**fields["rope_scaling"])})
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{where}: {e}") from None


def causal_config(cfg: ModelConfig, *, eos_id: int, bos_id: Optional[int] = None,
                  pad_id: Optional[int] = None, max_position_embeddings: int = 4096,
                  dtype: str = "bfloat16") -> Dict[str, Any]:
    """config.json of our model for ``cfg`` as a Hugging Face causal LM of ``architecture(cfg)``
    (what ``AutoConfig`` reads; the vocabulary is our padded rows, untied)."""
    arch = architecture(cfg)
    rope: Dict[str, Any] = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    sc = cfg.rope_scaling
    if sc.type == "linear":
        rope.update(rope_type="linear", factor=sc.factor)
    elif sc.type == "llama3":
        rope.update(rope_type="llama3", factor=sc.factor, low_freq_factor=sc.low_freq_factor,
                    high_freq_factor=sc.high_freq_factor,
                    original_max_position_embeddings=sc.original_max_position_embeddings)
    config: Dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.kv_channels,
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to_multiple_of),
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "use_cache": True,
        "eos_token_id": eos_id, "bos_token_id": bos_id,
        "pad_token_id": eos_id if pad_id is None else pad_id,
        # both spellings: transformers 5 reads rope_parameters, 4 rope_theta / rope_scaling
        "rope_parameters": rope, "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None if sc.type == "none" else dict(rope),
        "dtype": dtype, "torch_dtype": dtype,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None,
                      max_window_layers=cfg.num_layers,
                      layer_types=["full_attention"] * cfg.num_layers)
        if arch == "qwen3":
            config["attention_bias"] = False
    return dict(sorted(config.items()))


# ----------------------------------------------------------------------------- tensors
def causal_shapes(cfg: ModelConfig, tied: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the Hugging Face layout of ``cfg``'s architecture, with its shape."""
    ours = full_shapes(cfg)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name, theirs in _names(cfg).items():
        if isinstance(theirs, str):
            shapes[theirs] = ours[name]
    L, d = cfg.num_layers, cfg.kv_channels
    for i in range(L):
        b = f"model.layers.{i}."
        for part, n in (("q", cfg.num_attention_heads), ("k", cfg.num_kv_heads),
                        ("v", cfg.num_kv_heads)):
            shapes[f"{b}self_attn.{part}_proj.weight"] = (n * d, cfg.hidden_size)
            if cfg.qkv_bias:
                shapes[f"{b}self_attn.{part}_proj.bias"] = (n * d,)
        for part in ("gate", "up"):
            shapes[f"{b}mlp.{part}_proj.weight"] = (cfg.ffn_hidden_size, cfg.hidden_size)
    if tied:
        del shapes["lm_head.weight"]
    return shapes


def _names(cfg: ModelConfig) -> Dict[str, Optional[str]]:
    """Our name -> theirs for the tensors that map one to one (None: qkv and fc1, split)."""
    L = cfg.num_layers
    names: Dict[str, Optional[str]] = {}
    for name in full_shapes(cfg):
        piece, _, rest = name.partition(".")
        i = int(piece)
        if i == 0:
            names[name] = "model.embed_tokens.weight"
        elif i == L + 1:
            names[name] = "model.norm.weight" if rest.startswith("final") else "lm_head.weight"
        else:
            local = rest.removeprefix("layer.")
            names[name] = (f"model.layers.{i - 1}.{_LAYER_SAME[local]}" if local in _LAYER_SAME
                           else None)
    return names


def _qkv_hf(i: int, kind: str) -> Tuple[str, str, str]:
    b = f"model.layers.{i}.self_attn."
    return tuple(f"{b}{p}_proj.{kind}" for p in "qkv")


def from_causal(hf: Mapping[str, Tensor], cfg: ModelConfig, tied: bool = False
                ) -> Dict[str, Tensor]:
    """A Hugging Face causal LM's state dict -> our full weights (same dtype); HFFormatError on
    a missing, extra or misshapen tensor. ``tied``: no lm_head; ours starts as the embedding."""
    if tied and "lm_head.weight" in hf:  # some tied checkpoints store the shared tensor twice
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    check_tensors(hf, causal_shapes(cfg, tied), "checkpoint", ignore_suffix="rotary_emb.inv_freq")
    ours: Dict[str, Tensor] = {}
    for name, theirs in _names(cfg).items():
        if theirs == "lm_head.weight" and tied:
            ours[name] = hf["model.embed_tokens.weight"].clone()
        elif theirs is not None:
            ours[name] = hf[theirs]
    for i in range(cfg.num_layers):
        o, b = f"{i + 1}.layer.", f"model.layers.{i}."
        ours[o + "self_attention.linear_qkv.weight"] = merge_qkv(
            *(hf[n] for n in _qkv_hf(i, "weight")), cfg)
        if cfg.qkv_bias:
            ours[o + "self_attention.linear_qkv.bias"] = merge_qkv(
                *(hf[n][:, None] for n in _qkv_hf(i, "bias")), cfg)[:, 0]
        ours[o + "mlp.linear_fc1.weight"] = torch.cat([hf[b + "mlp.gate_proj.weight"],
                                                       hf[b + "mlp.up_proj.weight"]], dim=0)
    return {name: ours[name] for name in full_shapes(cfg)}


def to_causal(weights: Mapping[str, Tensor], cfg: ModelConfig) -> Dict[str, Tensor]:
    """Our full weights -> the Hugging Face causal LM's state dict (the inverse of
    ``from_causal``, untied); HFFormatError unless ``weights`` is exactly our model for ``cfg``."""
    check_tensors(weights, full_shapes(cfg), "weights")
    hf: Dict[str, Tensor] = {theirs: weights[name] for name, theirs in _names(cfg).items()
                             if theirs is not None}
    for i in range(cfg.num_layers):
        o, b = f"{i + 1}.layer.", f"model.layers.{i}."
        for name, t in zip(_qkv_hf(i, "weight"),
                           split_qkv(weights[o + "self_attention.linear_qkv.weight"], cfg)):
            hf[name] = t
        if cfg.qkv_bias:
            for name, t in zip(_qkv_hf(i, "bias"), split_qkv(
                    weights[o + "self_attention.linear_qkv.bias"][:, None], cfg)):
                hf[name] = t[:, 0].clone()
        gate, up = weights[o + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf[b + "mlp.gate_proj.weight"], hf[b + "mlp.up_proj.weight"] = gate.clone(), up.clone()
    return {name: hf[name] for name in causal_shapes(cfg)}
