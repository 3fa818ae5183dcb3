"""``llada export`` of a trained checkpoint and ``init.from`` of the export: the same logits."""

import json

import pytest
import torch

from framework.launch.cli import main
from framework.config import ConfigError, load_config
from framework.model.model import head_logits
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE, quick_overrides


def make_trainer(run_dir, dataset, *extra):
    return build_trainer(load_config(DEBUG_RECIPE, quick_overrides(run_dir, dataset, steps=3) +
                               list(extra)))


def logits(trainer, tokens):
    module = trainer.engine.module.eval()
    with torch.no_grad():
        # the training model's head is fused (train.fused_head): its logits made whole here
        return head_logits(module(tokens, select=torch.ones_like(tokens, dtype=torch.bool)))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory, small_dataset):
    run = tmp_path_factory.mktemp("trained")
    trainer = make_trainer(run, small_dataset, "checkpoint.save_final=true")
    trainer.fit()
    return run, trainer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_init_from_gives_identical_logits(trained, tmp_path, small_dataset, capsys,
                                                      dtype):
    run, trainer = trained
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--dtype", dtype]) == 0
    assert "(step 3)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"] and config["n_layers"] == 4
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()

    fresh = make_trainer(tmp_path / "fresh", small_dataset, f"init.from={out}")
    tokens = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(0))
    if dtype == "float32":
        assert torch.equal(logits(fresh, tokens), logits(trainer, tokens))
    else:  # the weights rounded to bf16 once: the same model up to that rounding
        reference = trainer.engine.module
        rounded = {n: p.detach().to(torch.bfloat16).float() for n, p in
                   reference.named_parameters()}
        got = dict(fresh.engine.module.named_parameters())
        assert all(torch.equal(got[n].detach(), t) for n, t in rounded.items())


def test_export_refusals(trained, tmp_path, small_dataset, capsys):
    run, _ = trained
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "is not a checkpoint or checkpoints directory" in capsys.readouterr().err
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert main(["export", str(run), str(out)]) == 2  # never over an existing export
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="init.from: .*model.num_layers: 4 there, 2 here"):
        make_trainer(tmp_path / "other", small_dataset, f"init.from={out}",
                     "model.num_layers=2")
    # a checkpoint is a source too, and its tokenizer must be the data's
    with pytest.raises(ConfigError, match="init.from: .*model.num_layers: 4 there, 2 here"):
        make_trainer(tmp_path / "other2", small_dataset, f"init.from={run}",
                     "model.num_layers=2")
    (out / "tokenizer.model").write_bytes(b"another tokenizer")  # not even a tokenizer
    with pytest.raises(ConfigError, match="init.from: .*tokenizer.model is not a SentencePiece"):
        make_trainer(tmp_path / "other3", small_dataset, f"init.from={out}")
    from tests.unit.hf_models import sp_tokenizer  # a real tokenizer, but another one
    (out / "tokenizer.model").write_bytes(sp_tokenizer(tmp_path).read_bytes())
    with pytest.raises(ConfigError, match="init.from: .*another tokenizer than the run's data"):
        make_trainer(tmp_path / "other4", small_dataset, f"init.from={out}")


def test_init_from_crosses_objectives_and_an_export_keeps_its_own(world, tmp_path, small_dataset,
                                                                  capsys):
    """The architecture is shared: a diffusion run starts from autoregressive weights, exactly;
    the export of an autoregressive run is a Llama, and loads as the causal model it is."""
    from framework.inference.model import load
    from framework.model.weights import full_state_dict

    ar_run = tmp_path / "ar"
    ar = make_trainer(ar_run, small_dataset, "objective.kind=ar", "checkpoint.save_final=true")
    ar.fit()
    diffusion = make_trainer(tmp_path / "mdm", small_dataset, f"init.from={ar_run}")
    assert "(trained with objective ar)" in capsys.readouterr().out
    a, b = full_state_dict(ar.engine.module, 1), full_state_dict(diffusion.engine.module, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "hf"
    assert main(["export", str(ar_run), str(out)]) == 0
    # the autoregressive baseline exports as a standard Llama (tests/unit/test_hf_causal.py)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for source in (out, ar_run):
        im = load(source, "cpu")
        assert im.objective == "ar"
        assert all(m.causal for name, m in im.model.named_modules()
                   if name.endswith("core_attention"))
    # the export read back as the Hugging Face Llama it is (model.from_hf + init.from) and
    # adapted to diffusion with Dream's shift and the annealed mask: it starts from exactly the
    # AR weights (as exported: bf16) and trains
    adapted = make_trainer(tmp_path / "adapt", small_dataset, f"init.from={out}",
                           f"model.from_hf={out}", "objective.logit_shift=true",
                           "objective.anneal_steps=2")
    c = full_state_dict(adapted.engine.module, 1)
    assert c.keys() == a.keys() and all(torch.equal(c[k], a[k].bfloat16().float()) for k in a)
    adapted.fit()
    assert json.loads((tmp_path / "adapt" / "summary.json").read_text())["steps"] == 3
