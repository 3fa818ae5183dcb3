"""Every parallel layout computes the same training run as one process: the losses of 3
optimizer steps and the weights after them, within 1e-5 relative (fp32, gloo, <= 4 processes),
for the LLaDA objective and (layouts ar-*, sft-*, adapt-*) the autoregressive baseline's, SFT's and
an adaptation's (the logit shift, the annealed mask, the mixed objective); and the same held-out
evaluation of the same checkpoint under DP2, TP2 and PP2, within 1e-5 relative, bit for bit the
same when evaluated twice.

Two torchrun launches (2 and 4 processes) each run several layouts in turn; the reference is the
same trainer in this process (a world of one), which saves the checkpoint the eval-* layouts
resume."""

import json

import pytest
import torch

from framework.config import load_config
from framework.model.weights import full_state_dict
from framework.training.factory import build_trainer
from tests.conftest import DEBUG_RECIPE, run_cli, validation_overrides
from tests.distributed.layout_worker import EVAL, STEPS, layout_overrides

pytestmark = pytest.mark.slow

DP2 = "data.num_workers=1"  # 2 data-parallel ranks x 1 worker: the reference's 2 readers
AR = "objective.kind=ar"
# adapting an autoregressive model: every step of the 3 under a partly causal mask (r = 0, 1/4,
# 1/2), each micro-batch's clean rows causal, the head at the positions before the masked ones
ADAPT = ["objective.logit_shift=true", "objective.anneal_steps=4", "objective.ar_loss_weight=0.3"]
TWO = {  # with one data-parallel rank the ZeRO stages partition nothing: ZeRO-1 stands for all
    "tp2": ["parallel.tp=2", "deepspeed.zero_stage=1"],
    "tp2-sequence-parallel": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    # uneven stages, activations recomputed in the first layer of each stage
    "pp2-recompute": ["parallel.pp=2", "deepspeed.zero_stage=1", "parallel.pp_layers=[1,3]",
                      "train.activation_checkpointing=true", "train.checkpoint_layers=1"],
    "dp2-zero1": [DP2, "deepspeed.zero_stage=1"],
    "dp2-zero2": [DP2, "deepspeed.zero_stage=2"],
    "dp2-zero3": [DP2, "deepspeed.zero_stage=3"],
    # the autoregressive objective (causal attention, next-token CE) against its own reference
    "ar-tp2": [AR, "parallel.tp=2", "deepspeed.zero_stage=1"],
    "ar-pp2": [AR, "parallel.pp=2", "deepspeed.zero_stage=1"],
    "ar-dp2-zero2": [AR, DP2, "deepspeed.zero_stage=2"],
}
FOUR = {
    "tp2xdp2-zero1": ["parallel.tp=2", DP2, "deepspeed.zero_stage=1"],
    "tp2xdp2-zero2": ["parallel.tp=2", DP2, "deepspeed.zero_stage=2"],
    "tp2xdp2-zero3": ["parallel.tp=2", DP2, "deepspeed.zero_stage=3"],
    "pp2xdp2-zero1": ["parallel.pp=2", DP2, "deepspeed.zero_stage=1"],
    "tp2xpp2-zero1": ["parallel.tp=2", "parallel.pp=2", "deepspeed.zero_stage=1"],
    # SFT (prompt never masked, each sequence / its response length) against its own reference
    "sft-pp2xdp2-zero1": ["parallel.pp=2", DP2, "deepspeed.zero_stage=1"],
    # the adaptation keys against their own reference: the masks set on both stages, the head's
    # shifted positions through the pipeline, the duplicated rows in the vocab-parallel loss
    "adapt-tp2xpp2-zero1": [*ADAPT, "parallel.tp=2", "parallel.pp=2", "deepspeed.zero_stage=1"],
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def eval_layouts(checkpoint, heldout) -> dict:
    same = [f"checkpoint.resume={checkpoint}", *validation_overrides(heldout), *EVAL]
    return {"eval-dp2": [DP2, *same], "eval-tp2": ["parallel.tp=2", *same],
            "eval-pp2": ["parallel.pp=2", *same]}


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory, small_dataset, small_heldout):
    """The losses, weights, a ZeRO-1 checkpoint (which reshards into any layout) and its
    held-out evaluation, of one process."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = build_trainer(load_config(DEBUG_RECIPE, layout_overrides(
        run_dir, small_dataset, ["deepspeed.zero_stage=1", *validation_overrides(small_heldout),
                                 *EVAL])))
    losses = [trainer.train_step().loss for _ in range(STEPS)]
    trainer.data.close()
    checkpoint = trainer.save_checkpoint()
    evaluations = [trainer.validator.evaluate() for _ in range(2)]
    return losses, full_state_dict(trainer.engine.module, 1), checkpoint, evaluations


def objective_reference(run_dir, dataset, objective):
    """The losses and weights of another objective (its overrides), of one process."""
    trainer = build_trainer(load_config(DEBUG_RECIPE, layout_overrides(
        run_dir, dataset, ["deepspeed.zero_stage=1", *objective])))
    losses = [trainer.train_step().loss for _ in range(STEPS)]
    trainer.data.close()
    return losses, full_state_dict(trainer.engine.module, 1)


@pytest.fixture(scope="module")
def ar_reference(world, tmp_path_factory, small_dataset):
    return objective_reference(tmp_path_factory.mktemp("ar-reference"), small_dataset, [AR])


@pytest.fixture(scope="module")
def sft_reference(world, tmp_path_factory, small_sft_dataset):
    return objective_reference(tmp_path_factory.mktemp("sft-reference"), small_sft_dataset,
                               ["objective.kind=sft"])


@pytest.fixture(scope="module")
def adapt_reference(world, tmp_path_factory, small_dataset):
    return objective_reference(tmp_path_factory.mktemp("adapt-reference"), small_dataset, ADAPT)


# Hugging Face models made by transformers, of layout_worker.MODEL's sizes, started from with
# init.from + model.from_hf: Qwen3's QK norms (their gains' gradients summed over tensor
# parallelism) and own head_dim under TP2 x PP2; Qwen2's QKV biases split under TP2
HF_SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2)
HF_ARCHS = {"qwen3": dict(head_dim=32), "qwen2": {}}
HF_LAYOUTS = {  # name (its architecture first) -> (processes, layout)
    "qwen3-tp2xpp2-zero1": (4, ["parallel.tp=2", "parallel.pp=2", "deepspeed.zero_stage=1"]),
    "qwen2-tp2": (2, ["parallel.tp=2", "deepspeed.zero_stage=1"])}


@pytest.fixture(scope="module")
def hf_references(world, tmp_path_factory, small_dataset):
    """{arch: (its directory's overrides, (losses, weights) of one process)}."""
    from tests.unit.hf_models import make_hf
    refs = {}
    for arch, extra in HF_ARCHS.items():
        out = tmp_path_factory.mktemp(arch)
        make_hf(arch, out, tokenizer=small_dataset.parent / "tokenizer.model",
                **HF_SIZES, **extra)
        start = [f"init.from={out}", f"model.from_hf={out}"]
        refs[arch] = start, objective_reference(tmp_path_factory.mktemp(f"{arch}-reference"),
                                                small_dataset, start)
    return refs


def assert_same_evaluation(name, got, ref):
    a, b = got["values"]
    assert {k: v for k, v in a.items() if not k.startswith("time/")} == \
        {k: v for k, v in b.items() if not k.startswith("time/")}, f"{name}: not bit for bit"
    for key, value in ref.items():
        if key.startswith("val/"):
            assert a[key] == pytest.approx(value, rel=1e-5), f"{name}: {key}"
    assert a.keys() == ref.keys() == got["after_a_step"].keys(), name
    assert got["after_a_step"]["val/small/loss"] < a["val/small/loss"], name  # it trained


@pytest.mark.parametrize("nproc, layouts", [(2, TWO), (4, FOUR)], ids=["2-procs", "4-procs"])
def test_layouts_match_one_process(tmp_path, small_dataset, small_heldout, small_sft_dataset,
                                   reference, ar_reference, sft_reference, adapt_reference,
                                   hf_references, nproc, layouts):
    _, _, checkpoint, ref_evals = reference
    assert ar_reference[0] != reference[0]  # the objective took effect
    assert adapt_reference[0] != reference[0]  # and the adaptation
    if nproc == 2:
        layouts = {**layouts, **eval_layouts(checkpoint, small_heldout)}
    layouts = {**layouts, **{name: [*hf_references[name.split("-")[0]][0], *layout]
                             for name, (n, layout) in HF_LAYOUTS.items() if n == nproc}}
    sft_data = [f"data.datasets=[{{manifest: {small_sft_dataset}}}]", "objective.kind=sft"]
    layouts = {name: extra + sft_data if name.startswith("sft-") else extra
               for name, extra in layouts.items()}
    proc = run_cli([], nproc=nproc, timeout=900, module="tests.distributed.layout_worker",
                   module_args=[str(tmp_path), str(small_dataset), json.dumps(layouts)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {k: v for k, v in ref_evals[0].items() if k.startswith("val/")} == \
        {k: v for k, v in ref_evals[1].items() if k.startswith("val/")}
    for name in layouts:
        got = torch.load(tmp_path / f"{name}.pt")
        if name.startswith("eval-"):
            assert_same_evaluation(name, got, ref_evals[0])
            continue
        ref_losses, ref_weights = {"ar": ar_reference, "sft": sft_reference,
                                   "adapt": adapt_reference,
                                   **{arch: ref for arch, (_, ref) in hf_references.items()}
                                   }.get(name.split("-")[0], reference[:2])
        split = got["split"]  # where the steps' time went: pipelines too (DeepSpeed's timer)
        assert split["forward_backward"] > 0 and split["optimizer"] > 0, (name, split)
        assert sum(split.values()) <= 1 + 1e-6, (name, split)
        for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
            assert abs(a - b) <= 1e-5 * abs(b), f"{name}: step {step} loss {a} vs {b}"
        assert got["weights"].keys() == ref_weights.keys(), name
        for key, ref in ref_weights.items():
            assert relative(got["weights"][key], ref) <= 1e-5, f"{name}: {key}"
