import pytest
import torch

from framework.config import ModelConfig, load_config
from framework.model.params import padded_vocab_size
from framework.parallel.layout import recompute_flags, stage_bounds
from framework.model.model import Head, Layer, LLaDAModel, build_model, transformer_config
from framework.model.weights import init_weights
from tests.conftest import REPO

TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                   ffn_hidden_size=96, vocab_size=300)


def build(cfg: ModelConfig, dtype=torch.float32, **kwargs) -> LLaDAModel:
    tc = transformer_config(cfg, tensor_parallel=1, params_dtype=dtype, on_cpu=True)
    model = build_model(cfg, tc, **kwargs)
    if not any(p.is_meta for p in model.parameters()):
        init_weights(model, cfg, seed=0, tp_rank=0, tp=1)
    return model


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


def test_autoregressive_attention_is_causal(world):
    """The mirror of the test above: with causal attention (objective.kind ar) changing token j
    changes nothing before j, and does change j itself and after."""
    torch.manual_seed(0)
    model = build(TINY, causal=True).eval()
    x = torch.randint(0, 300, (2, 17))
    base = model(x)
    for j in (16, 9, 1):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 300
        changed = (model(y) - base).abs().amax(-1)
        assert torch.all(changed[:, :j] == 0), f"a position before {j} saw token {j}"
        assert torch.all(changed[:, j:] > 1e-6), f"positions from {j} on ignored token {j}"


def test_causal_and_bidirectional_models_share_parameters(world):
    a, b = build(TINY), build(TINY, causal=True)
    assert [(n, p.shape) for n, p in a.named_parameters()] == \
        [(n, p.shape) for n, p in b.named_parameters()]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_head_at_selected_positions_matches_full_head(world):
    torch.manual_seed(1)
    model = build(TINY).eval()
    x = torch.randint(0, 300, (3, 11))
    select = torch.rand(3, 11) < 0.4
    full = model(x)
    assert full.shape == (3, 11, padded_vocab_size(300, 128))
    assert torch.allclose(model(x, select), full[select], atol=1e-5)
    # the same positions as flat indices (the trainer's, found on the host: no device sync)
    positions = select.reshape(-1).nonzero().squeeze(1)
    assert torch.allclose(model(x, positions), full[select], atol=1e-5)


def test_fused_head_gives_the_unfused_loss_and_gradients(world):
    """The model's fused head (train.fused_head) against its unfused one: same weights, same
    loss through ObjectiveLoss and the same gradients of every parameter."""
    from framework.model.model import head_loss
    from framework.training.objective import ObjectiveLoss, masked_labels
    torch.manual_seed(2)
    x, targets = torch.randint(0, 300, (3, 11)), torch.randint(0, 300, (3, 11))
    mask = torch.rand(3, 11) < 0.5
    labels = masked_labels(targets, mask, torch.tensor([0.3, 0.5, 0.9]), torch.full((3,), 11.0))
    results = []
    for fused in (False, True):
        model = build(TINY)
        model.get_submodule(str(TINY.num_layers + 1)).fused = fused
        loss = ObjectiveLoss(head_loss, lambda _: None, None)(model(x, labels.positions), labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (unfused, unfused_grads), (fused, fused_grads) = results
    assert torch.allclose(fused, unfused, rtol=1e-6)
    for got, want in zip(fused_grads, unfused_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_layers_follow_the_llada_spec(world):
    model = build(TINY)
    pieces = list(model.children())
    assert len(pieces) == TINY.num_layers + 2  # embedding, layers, head
    layer = pieces[1].layer
    assert isinstance(pieces[1], Layer) and isinstance(pieces[-1], Head)
    assert type(layer.self_attention.core_attention).__name__ == "SDPAttention"
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    assert isinstance(pieces[-1].final_layernorm, torch.nn.RMSNorm)
    assert all("bias" not in name for name, _ in model.named_parameters())
    # SwiGLU: fc1 holds gate and up projections
    assert layer.mlp.linear_fc1.weight.shape == (2 * 96, 64)
    # untied: the head and the embedding are different tensors
    assert pieces[-1].output_layer.weight.data_ptr() != pieces[0].word_embeddings.weight.data_ptr()
    # global names: the same under every pipeline layout
    assert "3.final_layernorm.weight" in dict(model.named_parameters())


def test_initialisation_is_seeded_per_parameter(world):
    a, b = build(TINY), build(TINY)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    params = dict(a.named_parameters())
    assert abs(params["0.word_embeddings.weight"].std().item() - TINY.init_std) < 2e-3
    # residual projections are scaled down by sqrt(2 x layers)
    proj = params["1.layer.self_attention.linear_proj.weight"].std().item()
    assert abs(proj - TINY.init_std / 2) < 2e-3
    assert not torch.equal(params["1.layer.mlp.linear_fc2.weight"][:8, :8],
                           params["2.layer.mlp.linear_fc2.weight"][:8, :8])


def test_activation_checkpointing_leaves_gradients_unchanged(world):
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=96, vocab_size=300)
    x = torch.randint(0, 300, (2, 13))
    select = torch.rand(2, 13) < 0.5
    grads = []
    for recompute in (False, True):
        model = build(cfg, recompute=recompute)
        assert [getattr(p, "recompute", None) for p in list(model.children())[1:-1]] == [recompute] * 3
        model(x, select).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-6, atol=0), name


def test_stage_bounds_and_per_stage_recompute():
    # pieces: 0 embedding, 1..7 layers, 8 head
    assert stage_bounds(7, 1) == [0, 9]
    assert stage_bounds(7, 2) == [0, 5, 9]  # 4 + 3 layers
    assert stage_bounds(7, 3, [1, 4, 2]) == [0, 2, 6, 9]
    flags = recompute_flags(7, stage_bounds(7, 2), True, 1)
    assert flags == [True, False, False, False, True, False, False]
    assert recompute_flags(7, [0, 9], True, None) == [True] * 7
    assert recompute_flags(7, [0, 9], False, None) == [False] * 7


def test_vocab_is_padded_the_same_under_every_layout():
    assert padded_vocab_size(300, 128) == 384
    assert padded_vocab_size(126464, 128) == 126464


@pytest.mark.parametrize("recipe, expected", [("llada-1b.yaml", 1.49e9), ("llada-8b.yaml", 8.02e9)])
def test_paper_sizes_on_meta_device(world, recipe, expected):
    cfg = load_config(REPO / "recipes" / recipe, ["data.datasets=[{manifest: x}]"])
    with torch.device("meta"):
        model = build(cfg.model, torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - expected) / expected < 0.01, total


def test_cuda_attention_never_falls_back_to_math():
    from torch.nn.attention import SDPBackend

    from framework.model.attention import cuda_backends
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for masked in (False, True):
            for gqa in (False, True):
                backends = cuda_backends(dtype, masked=masked, gqa=gqa)
                assert backends and SDPBackend.MATH not in backends
                if gqa:  # grouped key/value heads: only flash reads them unrepeated
                    assert SDPBackend.CUDNN_ATTENTION not in backends
    # training in bf16: flash, the grouped heads read in place
    assert cuda_backends(torch.bfloat16, masked=False, gqa=True) == [SDPBackend.FLASH_ATTENTION]
