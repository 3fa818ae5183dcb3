"""Tiny random Hugging Face causal LMs (Llama, Qwen2, Qwen3) made by transformers, for the tests
of init.from, model.from_hf and the AR export (tests/unit/test_hf_causal.py) and of the layouts
(tests/distributed/test_layouts.py)."""

import shutil
from pathlib import Path

import torch

VOCAB = 320  # a multiple of 64: the rows split under tensor parallelism; > the tokenizer's
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
ARCHS = {
    # GQA, Llama 3.1's RoPE scaling, tied embeddings
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_theta=50000.0, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6)),  # QKV biases
    # QK norms; a head dimension other than hidden / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
}


def make_hf(arch: str, out, seed: int = 0, tokenizer: Path = None, **sizes):
    """A tiny random model of ``arch`` saved by transformers, with nonzero biases and norm gains
    (so that a dropped or misplaced one shows). ``sizes`` override SMALL's; ``tokenizer``: a
    tokenizer file copied beside the weights (init.from checks it against the data's)."""
    import transformers
    conf_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, conf_cls)(**{**SMALL, **extra, **sizes})
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else
                        0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, Path(out) / Path(tokenizer).name)
    return model


def sp_tokenizer(tmp_path):
    """A small SentencePiece model of ours (mask and chat tokens), trained here."""
    from data_pipeline.config import TokenizerConfig
    from data_pipeline.tokenizer import train_tokenizer
    text = tmp_path / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + 'é'\n" for i in range(400)))
    return train_tokenizer([text], TokenizerConfig(vocab_size=300, train_bytes=10**6),
                           tmp_path / "tokenizer.model").path
