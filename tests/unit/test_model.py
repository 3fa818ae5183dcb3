import pytest
import torch

from framework.config import ModelConfig, load_config
from framework.flops import matmul_params, train_flops_per_token
from framework.model.model import LLaDAModel, padded_vocab_size, transformer_config
from tests.conftest import REPO

TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                   ffn_hidden_size=96, vocab_size=300)


def build(cfg: ModelConfig, dtype=torch.float32) -> LLaDAModel:
    tc = transformer_config(cfg, tensor_parallel=1, pipeline_parallel=1, params_dtype=dtype,
                            on_cpu=True)
    return LLaDAModel(cfg, tc)


def test_attention_is_bidirectional(world):
    torch.manual_seed(0)
    model = build(TINY).eval()
    x = torch.randint(0, 300, (2, 17))
    base = model(x)
    for j in (16, 9):  # change a later token: every earlier position must see it
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 300
        changed = (model(y) - base).abs().amax(-1)
        assert torch.all(changed[:, :j] > 1e-6), f"positions before {j} ignored token {j}"


def test_head_at_selected_positions_matches_full_head(world):
    torch.manual_seed(1)
    model = build(TINY).eval()
    x = torch.randint(0, 300, (3, 11))
    select = torch.rand(3, 11) < 0.4
    full = model(x)
    assert full.shape == (3, 11, model.padded_vocab_size)
    assert torch.allclose(model(x, select), full[select], atol=1e-5)


def test_layers_follow_the_llada_spec(world):
    model = build(TINY)
    layer = model.decoder.layers[0]
    assert type(layer.self_attention.core_attention).__name__ == "BidirectionalSDPA"
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)
    assert all("bias" not in name for name, _ in model.named_parameters())
    # SwiGLU: fc1 holds gate and up projections
    assert layer.mlp.linear_fc1.weight.shape == (2 * 96, 64)
    # untied: the head and the embedding are different tensors
    assert model.output_layer.weight.data_ptr() != model.embedding.weight.data_ptr()


def test_vocab_is_padded_for_tensor_parallelism():
    assert padded_vocab_size(300, 128, 1) == 384
    assert padded_vocab_size(300, 128, 4) == 512
    assert padded_vocab_size(126464, 128, 8) == 126976


@pytest.mark.parametrize("recipe, expected", [("llada-1b.yaml", 1.49e9), ("llada-8b.yaml", 8.02e9)])
def test_paper_sizes_on_meta_device(world, recipe, expected):
    cfg = load_config(REPO / "recipes" / recipe, ["data.datasets=[{manifest: x}]"])
    with torch.device("meta"):
        model = build(cfg.model, torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - expected) / expected < 0.01, total
    # FLOPs per token: 6 x matmul params (head included, input embedding not) + attention
    assert matmul_params(cfg.model) == total - cfg.model.vocab_size * cfg.model.hidden_size - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert train_flops_per_token(cfg.model, 4096) > 6 * matmul_params(cfg.model)
