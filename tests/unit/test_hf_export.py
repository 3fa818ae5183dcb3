"""Export to / import from the public LLaDA Hugging Face layout (framework/checkpoint/hf_*.py): the
conversion is exact, the exported tensors compute the same logits under an independent forward of
the release's model (tests/unit/llada_reference.py), and the directory round-trips with clear
errors on mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from framework.config import ModelConfig
from framework.checkpoint.hf_files import read_hf_dir, write_hf_dir
from framework.checkpoint.hf_mapping import HFFormatError, from_hf, hf_config, hf_shapes, to_hf
from framework.model.params import full_shapes, padded_vocab_size
from tests.unit.llada_reference import llada_forward

# GQA with more than one group: 6 query heads in 3 groups of 2, head_dim 8
GQA = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_kv_heads=3,
                  ffn_hidden_size=80, vocab_size=300, rope_theta=10000.0)


def random_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.1) -> dict:
    """Full weights of every tensor, norm gains away from 1 so that a swapped norm shows."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (1.0 + 0.3 * torch.randn(shape, generator=gen)) if len(shape) == 1
            else std * torch.randn(shape, generator=gen)
            for name, shape in full_shapes(cfg).items()}


def test_round_trip_is_exact_with_grouped_query_attention():
    weights = random_weights(GQA)
    hf = to_hf(weights, GQA)
    assert list(hf) == list(hf_shapes(GQA))
    assert hf["model.transformer.blocks.0.q_proj.weight"].shape == (48, 48)
    assert hf["model.transformer.blocks.0.k_proj.weight"].shape == (24, 48)
    assert hf["model.transformer.blocks.1.ff_proj.weight"].shape == (80, 48)
    back = from_hf(hf, GQA)
    assert list(back) == list(weights)
    for name, t in weights.items():
        assert torch.equal(back[name], t), name
    # the per-group layout: group 1 of megatron's qkv is [q2; q3; k1; v1] (head_dim 8 rows each)
    qkv = weights["1.layer.self_attention.linear_qkv.weight"]
    group1 = qkv[32:64]
    assert torch.equal(group1[:16], hf["model.transformer.blocks.0.q_proj.weight"][16:32])
    assert torch.equal(group1[16:24], hf["model.transformer.blocks.0.k_proj.weight"][8:16])
    assert torch.equal(group1[24:32], hf["model.transformer.blocks.0.v_proj.weight"][8:16])
    # fc1 is [gate; up]: the gate is the release's ff_proj (the SiLU one)
    fc1 = weights["2.layer.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:80], hf["model.transformer.blocks.1.ff_proj.weight"])
    assert torch.equal(fc1[80:], hf["model.transformer.blocks.1.up_proj.weight"])


def test_conversion_names_a_missing_or_misshapen_tensor():
    weights = random_weights(GQA)
    del weights["2.layer.mlp.linear_fc2.weight"]
    with pytest.raises(HFFormatError, match=r"missing tensor 2\.layer\.mlp\.linear_fc2\.weight"):
        to_hf(weights, GQA)
    hf = to_hf(random_weights(GQA), GQA)
    hf["model.transformer.blocks.1.k_proj.weight"] = torch.zeros(48, 48)
    with pytest.raises(HFFormatError, match=r"blocks\.1\.k_proj\.weight has shape \(48, 48\)"):
        from_hf(hf, GQA)


def _our_model(cfg: ModelConfig, weights: dict):
    """Our model as the trainer builds it on a CPU (fp32, tp = 1), loaded from full weights."""
    from framework.model.model import build_model, transformer_config

    tc = transformer_config(cfg, tensor_parallel=1, params_dtype=torch.float32, on_cpu=True)
    model = build_model(cfg, tc).eval()
    params = dict(model.named_parameters())
    assert set(params) == set(weights)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    return model


def test_export_computes_the_same_logits_as_the_release_model(world):
    torch.manual_seed(0)
    weights = random_weights(GQA, seed=1)
    model = _our_model(GQA, weights)
    ids = torch.randint(0, GQA.vocab_size, (2, 13))
    config = hf_config(GQA, GQA.vocab_size, mask_id=299, eos_id=2, torch_dtype="float32")
    hf = to_hf(weights, GQA)
    with torch.no_grad():
        ours = model(ids)  # [b, s, V] at every position
        selected = model(ids, torch.ones_like(ids, dtype=torch.bool))  # the head at "masked" ones
    # the reference in float64: ours (float32) is compared with the exact math
    ref = llada_forward({k: v.double() for k, v in hf.items()}, config, ids).float()
    assert ours.shape == ref.shape == (2, 13, padded_vocab_size(300, 128))
    assert ref.abs().max() > 1.0  # logits big enough for the comparison to mean something
    assert (ours - ref).abs().max() < 1e-5
    assert (selected - ref.reshape(-1, ref.shape[-1])).abs().max() < 1e-5
    # the comparison is sensitive to the layout: swapping gate and up, or two kv groups, shows
    for a, b in (("ff_proj", "up_proj"), ("k_proj", "k_proj")):
        bad = dict(hf)
        key = "model.transformer.blocks.0.{}.weight"
        if a == b:
            bad[key.format(a)] = hf[key.format(a)].roll(8, dims=0)  # kv group g -> g + 1
        else:
            bad[key.format(a)], bad[key.format(b)] = hf[key.format(b)], hf[key.format(a)]
        assert (llada_forward(bad, config, ids) - ours).abs().max() > 1e-2, (a, b)


SPECIAL = ("mask", "eos", "pad", "bos", "unk", "start_header", "end_header", "eot")


@pytest.fixture(scope="module")
def tokenizer_and_cfg(small_tokenizer):
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(small_tokenizer)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, vocab_size=tok.vocab_size)
    return small_tokenizer, tok.special_ids(), cfg


def test_directory_round_trip_and_release_file_names(tmp_path, tokenizer_and_cfg):
    tokenizer, special, cfg = tokenizer_and_cfg
    weights = random_weights(cfg, seed=2)
    out = write_hf_dir(tmp_path / "hf", weights, cfg, tokenizer, special, dtype=torch.float32)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name != "hf"]  # no temporary left behind
    back = read_hf_dir(out, cfg)
    assert list(back) == list(weights)
    for name, t in weights.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], t), name

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"] and config["model_type"] == "llada"
    assert config["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert (config["d_model"], config["n_heads"], config["n_kv_heads"], config["n_layers"],
            config["mlp_hidden_size"]) == (32, 4, 2, 2, 64)
    assert config["vocab_size"] == cfg.vocab_size
    assert config["embedding_size"] == padded_vocab_size(cfg.vocab_size, 128)
    assert config["mask_token_id"] == special["mask"] and config["eos_token_id"] == special["eos"]
    assert (config["block_type"], config["activation_type"], config["layer_norm_type"],
            config["rope"], config["weight_tying"]) == ("llama", "silu", "rms", True, False)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["mask_token"] == "<|mdm_mask|>" and tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    assert tok_cfg["added_tokens_decoder"][str(special["mask"])]["content"] == "<|mdm_mask|>"
    tokens = json.loads((out / "special_tokens_map.json").read_text())
    assert "<|eot_id|>" in tokens["additional_special_tokens"]
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()

    # bf16 (the release's dtype) and sharded like the release: model-0000i-of-0000n + index
    sharded = write_hf_dir(tmp_path / "sharded", weights, cfg, tokenizer, special,
                           max_shard_bytes=30_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(hf_shapes(cfg))
    with safe_open(str(sharded / shards[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    again = read_hf_dir(sharded, cfg)
    for name, t in weights.items():
        assert torch.equal(again[name], t.to(torch.bfloat16).float()), name


def test_mismatches_are_named(tmp_path, tokenizer_and_cfg):
    tokenizer, special, cfg = tokenizer_and_cfg
    out = write_hf_dir(tmp_path / "hf", random_weights(cfg), cfg, tokenizer, special,
                       dtype=torch.float32)
    deeper = ModelConfig(**{**cfg.__dict__, "num_layers": 4})
    with pytest.raises(HFFormatError,
                       match=r"^config\.json: n_layers is 2 but model\.num_layers is 4$"):
        read_hf_dir(out, deeper)
    other_theta = ModelConfig(**{**cfg.__dict__, "rope_theta": 10000.0})
    with pytest.raises(HFFormatError, match=r"config\.json: rope_theta is 500000\.0"):
        read_hf_dir(out, other_theta)

    # a config.json of another block type is refused by key
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "block_type": "sequential"}))
    with pytest.raises(HFFormatError, match=r"config\.json: block_type is \"sequential\""):
        read_hf_dir(out, cfg)
    (out / "config.json").write_text(json.dumps(config))

    # a missing tensor is named
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(HFFormatError, match=r"missing tensor model\.transformer\.blocks\.1\."
                                            r"up_proj\.weight"):
        read_hf_dir(out, cfg)


def test_failed_export_leaves_nothing(tmp_path, tokenizer_and_cfg):
    tokenizer, special, cfg = tokenizer_and_cfg
    weights = random_weights(cfg)
    with pytest.raises(HFFormatError, match="special_ids: mask is 5"):
        write_hf_dir(tmp_path / "hf", weights, cfg, tokenizer, {**special, "mask": 5})
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one
    small = ModelConfig(**{**cfg.__dict__, "vocab_size": 256})  # fewer ids than the tokenizer
    with pytest.raises(HFFormatError, match="pieces but model.vocab_size is only 256"):
        write_hf_dir(tmp_path / "hf", random_weights(small), small, tokenizer, special)
    assert list(tmp_path.iterdir()) == []
    out = write_hf_dir(tmp_path / "hf", weights, cfg, tokenizer, special)
    with pytest.raises(FileExistsError):
        write_hf_dir(out, weights, cfg, tokenizer, special)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(HFFormatError):  # a failed overwrite keeps the previous export intact
        write_hf_dir(out, weights, cfg, tokenizer, {**special, "mask": 5}, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
