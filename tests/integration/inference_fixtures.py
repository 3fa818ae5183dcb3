"""An ``llada export`` directory of a tiny randomly initialised model (the small tokenizer's),
and local harness tasks: what the inference commands' end-to-end tests run on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_pipeline.tokenizer import load_tokenizer
from framework.checkpoint.hf_files import write_hf_dir
from framework.config import ModelConfig
from framework.model.model import build_model, transformer_config
from framework.model.weights import init_weights

MC_ROWS = [{"context": "import", "choices": [" os", " sys", " json"], "gold": 0},
           {"context": "def __init__(", "choices": ["self):", "cls):"], "gold": 0},
           {"context": "return", "choices": [" None", " True"], "gold": 1},
           {"context": "for i in", "choices": [" range(n):", " items:"], "gold": 0}]
GEN_ROWS = [{"prompt": "def f(x):\n    return", "answer": " x"},
            {"prompt": "import", "answer": " os"}]


def write_tiny_export(out: Path, tokenizer: Path, seed: int = 0) -> Path:
    tok = load_tokenizer(tokenizer)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                      ffn_hidden_size=64, vocab_size=tok.vocab_size, init_std=0.2)
    model = build_model(cfg, transformer_config(cfg, tensor_parallel=1,
                                                params_dtype=torch.float32, on_cpu=True))
    init_weights(model, cfg, seed, 0, 1)
    weights = {k: v.detach() for k, v in model.named_parameters()}
    return write_hf_dir(out, weights, cfg, tokenizer, tok.special_ids(), dtype=torch.float32,
                        max_sequence_length=128)


def write_tasks(out: Path) -> Path:
    """Two harness tasks over local JSON files (no download): multiple choice and generation."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("mc", MC_ROWS), ("gen", GEN_ROWS)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
              "test_split: test\n")
    (out / "llada_local_mc.yaml").write_text(
        "task: llada_local_mc\n" + common.format(path=out / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{gold}}\"\n"
        "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")
    (out / "llada_local_gen.yaml").write_text(
        "task: llada_local_gen\n" + common.format(path=out / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
        "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")
    return out
