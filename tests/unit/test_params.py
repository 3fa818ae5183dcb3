"""The parameter table against the model itself: built on the meta device (no initialisation,
no memory) for the paper's 1B and 8B recipes and a tiny GQA model, every parameter's global name
and full shape are the table's, in module order, and the parameter count and ``llada plan``'s
pieces add up to the model. (The split dimensions: every tensor-parallel layout is proven equal
to one process through them, tests/distributed/test_layouts.py.)"""

import pytest
import torch

from framework.config import ModelConfig, load_config
from framework.launch.plan import piece_params
from framework.model.model import build_model, transformer_config
from framework.model.params import param_table, total_params
from tests.conftest import REPO

TINY = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_kv_heads=3,
                   ffn_hidden_size=80, vocab_size=300)


def meta_model(cfg: ModelConfig, tp: int = 1):
    tc = transformer_config(cfg, tensor_parallel=tp, params_dtype=torch.bfloat16, on_cpu=True)
    with torch.device("meta"):
        return build_model(cfg, tc)


def recipe_model(name: str) -> ModelConfig:
    return load_config(REPO / "recipes" / name, need_data=False).model


@pytest.mark.parametrize("cfg", [TINY, "llada-1b.yaml", "llada-8b.yaml"], ids=str)
def test_the_table_is_the_model(world, cfg):
    cfg = recipe_model(cfg) if isinstance(cfg, str) else cfg
    model = meta_model(cfg)
    got = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    table = param_table(cfg)
    assert got == [(p.name, p.shape) for p in table]
    assert total_params(cfg) == sum(p.numel() for p in model.parameters())
    assert [sum(p.numel() for p in piece.parameters()) for piece in model.children()] == \
        [p.split + p.replicated for p in piece_params(cfg)]


def test_the_table_counts_the_padded_vocabulary_and_the_paper_sizes():
    one_b, eight_b = recipe_model("llada-1b.yaml"), recipe_model("llada-8b.yaml")
    assert abs(total_params(one_b) - 1.49e9) / 1.49e9 < 0.01
    assert abs(total_params(eight_b) - 8.02e9) / 8.02e9 < 0.01
    head = next(p for p in param_table(TINY) if p.is_head)
    assert head.shape == (384, 48)  # 300 padded to a multiple of 128
    matmul = {p.name for p in param_table(TINY) if p.kind.matmul}
    assert "0.word_embeddings.weight" not in matmul and "3.output_layer.weight" in matmul
    assert not any("norm" in n for n in matmul)
