"""A Hugging Face causal LM's config.json (Llama, Qwen2, Qwen3) as our model section's keys:
plain data, no torch, nothing of ours imported, so that the config loader (``model.from_hf``)
and the checkpoint readers (framework/checkpoint/hf_causal.py) read it the same way.

What our model computes exactly, and so what is accepted: RMSNorm, SwiGLU (silu), RoPE with
``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4) of type default,
linear or llama3, grouped-query attention, a ``head_dim`` of its own, QKV biases (Qwen2), QK norms
(Qwen3), every layer full attention. Anything else is an ``HFFormatError`` naming the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Mapping

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}


class HFFormatError(ValueError):
    """A Hugging Face directory (or export input) that is not the model we expect. The message
    is one line and names the file and the config key or tensor."""


def read_config_json(hf_dir: Path) -> Dict[str, Any]:
    """DIR/config.json as a dict; HFFormatError naming the file otherwise."""
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


def is_causal_config(config: Mapping[str, Any]) -> bool:
    """A Hugging Face causal LM's config.json of an architecture we read."""
    return config.get("model_type") in ARCHITECTURES


def is_tied(config: Mapping[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def _rope(config: Mapping[str, Any], where: str) -> tuple:
    """(theta, scaling) from transformers 5's ``rope_parameters`` or 4's ``rope_theta`` +
    ``rope_scaling``."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") \
        or "default"
    key = "rope_parameters" if params else "rope_scaling"
    if rope_type not in _ROPE_TYPES:
        raise HFFormatError(f"{where}: {key}.rope_type is {json.dumps(rope_type)}; supported: "
                            f"{', '.join(_ROPE_TYPES)}")
    given = {**scaling, **params}
    # what each type needs, as transformers requires it (no made-up defaults)
    needed = {"none": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}[_ROPE_TYPES[rope_type]]
    for k in needed:
        if not isinstance(given.get(k), (int, float)) or isinstance(given.get(k), bool):
            raise HFFormatError(f"{where}: {key}.{k} is {json.dumps(given.get(k))}; rope_type "
                                f"{rope_type} needs a number")
    fields = {k: given[k] for k in needed}
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise HFFormatError(f"{where}: rope_theta is {json.dumps(theta)}, not a positive number")
    return float(theta), {"type": _ROPE_TYPES[rope_type], **fields}


def model_fields(config: Mapping[str, Any], where: str = "config.json") -> Dict[str, Any]:
    """The model section's keys (all but init_std) a Llama/Qwen2/Qwen3 config.json gives;
    HFFormatError naming the key for anything our model cannot compute exactly (another
    architecture, biases elsewhere than Qwen2's q/k/v, sliding-window attention, another
    activation or RoPE scaling). Values are checked further by ModelConfig."""
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise HFFormatError(f"{where}: model_type is {json.dumps(arch)}; init.from takes "
                            f"{', '.join(ARCHITECTURES)} (Hugging Face) or llada checkpoints")

    def size(key: str, default: Any = None) -> int:
        value = config.get(key)
        value = default if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise HFFormatError(f"{where}: {key} is {json.dumps(value)}, not a positive integer")
        return value

    def refuse(key: str, why: str) -> None:
        raise HFFormatError(f"{where}: {key} is {json.dumps(config.get(key))}: {why}")

    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "our MLP is SwiGLU (silu)")
    if config.get("mlp_bias"):
        refuse("mlp_bias", "our MLP has no biases")
    if config.get("attention_bias") and arch != "qwen2":  # Llama's and Qwen3's bias o_proj too
        refuse("attention_bias", "our attention has no output-projection bias")
    if config.get("use_sliding_window"):
        refuse("use_sliding_window", "our attention attends to the whole sequence")
    if any(t != "full_attention" for t in config.get("layer_types") or []):
        refuse("layer_types", "every layer must be full_attention")
    hidden, heads = size("hidden_size"), size("num_attention_heads")
    head_dim = size("head_dim", hidden // heads)
    rows = size("vocab_size")
    theta, scaling = _rope(config, where)
    eps = config.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or eps <= 0:
        refuse("rms_norm_eps", "must be a positive number")
    return dict(
        num_layers=size("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_kv_heads=size("num_key_value_heads", heads),
        ffn_hidden_size=size("intermediate_size"),
        # the embedding's rows are the vocabulary; padded to itself (a multiple of up to 128
        # that divides it, so tensor parallelism can split it)
        vocab_size=rows, pad_vocab_to_multiple_of=math.gcd(rows, 128),
        rope_theta=theta, norm_eps=float(eps),
        head_dim=None if head_dim * heads == hidden else head_dim,
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", rope_scaling=scaling)
