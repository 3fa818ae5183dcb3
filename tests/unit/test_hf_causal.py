"""Hugging Face causal LMs in and out: tiny random Llama, Qwen2 and Qwen3 models made here by
transformers load through init.from's reader and, run causally, give transformers' logits
(fp32, 1e-5); an autoregressive export loads with AutoModelForCausalLM and gives ours; bad
directories are one line naming the key or file."""

import json

import pytest
import torch

from framework.checkpoint.hf_causal import causal_shapes, from_causal, to_causal
from framework.checkpoint.hf_files import write_hf_dir
from framework.checkpoint.hf_mapping import HFFormatError
from framework.checkpoint.source import copy_weights, read_source
from framework.config import ConfigError, load_config
from framework.model.model import build_model, transformer_config
from framework.model.params import full_shapes
from framework.model.weights import init_weights
from tests.conftest import DEBUG_RECIPE, run_cli
from tests.unit.hf_models import ARCHS, VOCAB, make_hf, sp_tokenizer

transformers = pytest.importorskip("transformers")

def ours(cfg, causal=True):
    tc = transformer_config(cfg, tensor_parallel=1, params_dtype=torch.float32, on_cpu=True)
    model = build_model(cfg, tc, causal=causal)
    init_weights(model, cfg, seed=0, tp_rank=0, tp=1)
    return model.eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_causal_lm_loads_and_matches_transformers(world, tmp_path, arch):
    theirs = make_hf(arch, tmp_path)
    src = read_source(tmp_path)
    assert src.objective == "ar" and src.model.qkv_bias == (arch == "qwen2")
    assert src.model.qk_norm == (arch == "qwen3")
    model = ours(src.model)
    copy_weights(model, src, "init.from")
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_names_round_trip(tmp_path, arch):
    make_hf(arch, tmp_path)
    src = read_source(tmp_path)
    back = to_causal(src.weights, src.model)
    assert set(back) == set(causal_shapes(src.model))
    again = from_causal(back, src.model)
    assert set(again) == set(full_shapes(src.model))
    assert all(torch.equal(again[k], src.weights[k]) for k in again)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_ar_export_loads_in_transformers(world, tmp_path, arch):
    """Our autoregressive baseline's export: AutoModelForCausalLM, no remote code, our logits."""
    make_hf(arch, tmp_path / "src")
    cfg = read_source(tmp_path / "src").model
    model = ours(cfg)  # our own random weights, not the source's
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if not k.endswith("_extra_state")}
    from data_pipeline.tokenizer import load_tokenizer
    tok = load_tokenizer(sp_tokenizer(tmp_path))
    write_hf_dir(tmp_path / "export", weights, cfg, tok.path, tok.special_ids(),
                 dtype=torch.float32, max_sequence_length=64, objective="ar")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == [ARCHS[arch][1]] and "auto_map" not in config
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    # and read back through init.from's reader: the same weights
    back = read_source(tmp_path / "export")
    assert back.objective == "ar" and back.model == cfg
    assert all(torch.equal(back.weights[k], weights[k]) for k in weights)


def test_ar_export_tokenizer_encodes_as_ours(tmp_path):
    """transformers' AutoTokenizer on the export encodes and decodes as our pipeline."""
    from data_pipeline.tokenizer import load_tokenizer
    from framework.checkpoint.hf_files import _tokenizer_export
    from framework.config import ModelConfig
    path = sp_tokenizer(tmp_path)
    tok = load_tokenizer(path)
    out = tmp_path / "tok"
    out.mkdir()
    for name, data in _tokenizer_export(path, tok.special_ids(), ModelConfig(vocab_size=VOCAB),
                                        64).items():
        (out / name).write_bytes(data)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["def f1(x):\n\n    return x * 3 + 'é'\n", "x\n\ny = 2\t ü", "return\n"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert hf.eos_token_id == tok.eos_id and hf.mask_token_id == tok.mask_id


def test_model_from_hf_derives_the_model_section(tmp_path):
    import yaml
    make_hf("qwen3", tmp_path)
    recipe = yaml.safe_load(DEBUG_RECIPE.read_text())
    recipe["model"] = {"from_hf": str(tmp_path), "init_std": 0.01}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "recipe.yaml", ["model.num_kv_heads=2"])  # agrees: allowed
    assert (cfg.model.num_layers, cfg.model.head_dim, cfg.model.qk_norm) == (2, 16, True)
    assert (cfg.model.vocab_size, cfg.model.init_std) == (VOCAB, 0.01)
    with pytest.raises(ConfigError, match="model.num_layers: 3 here, but model.from_hf"):
        load_config(tmp_path / "recipe.yaml", ["model.num_layers=3"])


def test_bad_directories_are_one_line(tmp_path):
    make_hf("llama", tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    cases = {
        "gpt2": ({**config, "model_type": "gpt2"}, "model_type is \"gpt2\""),
        "bias": ({**config, "attention_bias": True}, "attention_bias is true"),
        "rope": ({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
                 "rope_parameters.rope_type is \"yarn\""),
        "factor": ({**config, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},
                   "rope_parameters.factor is null"),  # never a made-up default
    }
    for name, (conf, why) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(conf))
        (d / "model.safetensors").write_bytes((tmp_path / "ok" / "model.safetensors").read_bytes())
        with pytest.raises(HFFormatError, match=why):
            read_source(d)
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match="no weights"):
        read_source(tmp_path / "ok")


def test_cli_refuses_an_unsupported_architecture(tmp_path):
    make_hf("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    r = run_cli(["plan", str(DEBUG_RECIPE), f"model.from_hf={tmp_path}"], timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "model_type is \"mistral\"" in lines[0]


def test_a_diffusion_model_with_qwen_options_exports_in_its_causal_layout(tmp_path):
    """The LLaDA release's layout has no QK norms or head_dim of its own: a diffusion run adapted
    from a Qwen3 exports as a Qwen3 that says what it is, and reads back as it was."""
    make_hf("qwen3", tmp_path / "src")
    src = read_source(tmp_path / "src")
    from data_pipeline.tokenizer import load_tokenizer
    tok = load_tokenizer(sp_tokenizer(tmp_path))
    write_hf_dir(tmp_path / "export", src.weights, src.model, tok.path, tok.special_ids(),
                 dtype=torch.float32, objective="pretrain", logit_shift=True)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["llada_objective"] == "pretrain"
    back = read_source(tmp_path / "export")
    assert (back.objective, back.logit_shift, back.model) == ("pretrain", True, src.model)
    assert all(torch.equal(back.weights[k], src.weights[k]) for k in src.weights)


def test_checkpoints_from_before_the_new_model_keys_resume(tmp_path):
    """A checkpoint's saved model section without qkv_bias, qk_norm, head_dim, rope_scaling,
    from_hf (older versions) is the same model; a moved from_hf directory is too."""
    from framework.checkpoint.resume import check_resumable
    from framework.config import to_dict
    cfg = load_config(DEBUG_RECIPE)
    config = to_dict(cfg)
    old = {k: v for k, v in config["model"].items()
           if k not in ("qkv_bias", "qk_norm", "head_dim", "rope_scaling", "from_hf")}
    meta = {"config": {"model": old, "train": config["train"], "objective": {"kind": "pretrain"}},
            "tokenizer_sha256": ["x"]}
    check_resumable(tmp_path, meta, config, ["x"], tmp_path)
    config["model"]["from_hf"] = "/moved/elsewhere"
    check_resumable(tmp_path, meta, config, ["x"], tmp_path)
    config["model"]["qk_norm"] = True
    with pytest.raises(ConfigError, match="model.qk_norm=False, the config has True"):
        check_resumable(tmp_path, meta, config, ["x"], tmp_path)
