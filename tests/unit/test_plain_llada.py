"""benchmarks/plain_llada.py, the plain loop the step benchmark measures the framework against:
the same model (the parameter table's count; the release's forward pass, tests/unit/
llada_reference.py, gives the same loss from its weights) and the LLaDA loss."""

import torch
import torch.nn.functional as F

from benchmarks.plain_llada import PlainLLaDA, masked_inputs
from framework.config import ModelConfig
from framework.model.params import total_params
from tests.unit.llada_reference import P, llada_forward

CFG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, vocab_size=250, pad_vocab_to_multiple_of=128)


def release_weights(model: PlainLLaDA) -> dict:
    """The plain model's weights under the release's keys (q|k|v and gate|up split)."""
    h, f, d = CFG.hidden_size, CFG.ffn_hidden_size, CFG.hidden_size // CFG.num_attention_heads
    sd = {P + "wte.weight": model.embed.weight, P + "ln_f.weight": model.norm.weight,
          P + "ff_out.weight": model.head.weight}
    for i, layer in enumerate(model.layers):
        b = f"{P}blocks.{i}."
        q, k, v = layer.qkv.weight.split([h, CFG.num_kv_heads * d, CFG.num_kv_heads * d])
        sd.update({b + "attn_norm.weight": layer.attn_norm.weight, b + "q_proj.weight": q,
                   b + "k_proj.weight": k, b + "v_proj.weight": v,
                   b + "attn_out.weight": layer.proj.weight,
                   b + "ff_norm.weight": layer.mlp_norm.weight,
                   b + "ff_proj.weight": layer.fc1.weight[:f],
                   b + "up_proj.weight": layer.fc1.weight[f:],
                   b + "ff_out.weight": layer.fc2.weight})
    return {k: w.detach() for k, w in sd.items()}


def test_the_plain_model_has_the_parameter_tables_count():
    model = PlainLLaDA(CFG)
    assert sum(p.numel() for p in model.parameters()) == total_params(CFG)


def test_the_plain_loss_is_the_llada_loss_of_the_release_model():
    torch.manual_seed(0)
    model = PlainLLaDA(CFG)
    for p in model.parameters():  # norm gains away from 1, so that they are checked too
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    b, s = 3, 24
    targets = torch.randint(0, CFG.vocab_size, (b, s))
    p_mask = torch.tensor([0.2, 0.5, 0.9])
    mask = torch.rand(b, s) < p_mask[:, None]
    noisy = torch.where(mask, torch.full_like(targets, 249), targets)

    loss = model.loss(*masked_inputs(noisy, targets, mask, p_mask))
    config = {"d_model": CFG.hidden_size, "n_heads": CFG.num_attention_heads,
              "n_kv_heads": CFG.num_kv_heads, "n_layers": CFG.num_layers,
              "rms_norm_eps": CFG.norm_eps, "rope_theta": CFG.rope_theta}
    logits = llada_forward(release_weights(model), config, noisy)
    ce = F.cross_entropy(logits[mask], targets[mask], reduction="none")
    want = (ce / p_mask[:, None].expand(b, s)[mask]).sum() / (b * s)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)

    loss.backward()  # every parameter takes part
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
