"""``llada validate RUN_DIR|CHECKPOINT [--data MANIFEST ...]``: the held-out bound of a checkpoint
of any layout, on one process, with the estimator and masks the run's own evaluations use (the
exact NLL for an autoregressive model; the bound of the responses given their prompts on SFT
data).

The checkpoint's full fp32 weights (read as ``llada export`` reads them; or an export
directory's: framework/inference/model.py) go into a one-process model; the sets are ``--data``
manifests or the run's ``data.validation``; the evaluation settings are the run's ``eval``
section unless given (``llada eval --data`` of an export: EvalConfig's defaults). On a CPU the model runs in fp32, so a run
trained and evaluated in bf16 reads slightly differently here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from data_pipeline.config import DataConfig, ValidationSetConfig
from data_pipeline.datasets import check_tokenizer
from data_pipeline.shards import load_manifest
from framework.config import ConfigError, EvalConfig, ParallelConfig, from_data
from framework.evaluation.validator import HeldOutSet, Validator
from framework.model.model import vocab_cross_entropy
from framework.parallel.world import init_world


def _sets(manifests: List[str], saved_data: dict) -> List[ValidationSetConfig]:
    if manifests:
        sets = [ValidationSetConfig(name=load_manifest(m, key="--data").name, manifest=m)
                for m in manifests]
        names = [s.name for s in sets]
        if len(set(names)) < len(names):
            raise ConfigError(f"--data: two manifests name the same set ({names}); their "
                              "results would overwrite one another")
        return sets
    data = from_data(DataConfig, {"validation": saved_data.get("validation", [])},
                     key="data.validation")
    if not data.validation:
        raise ConfigError("--data: the run names no held-out set (data.validation); pass a "
                          "manifest, e.g. --data DIR/holdout/manifest.json")
    return data.validation


def validate(source: Path, manifests: List[str] = (), *, sequences: Optional[int] = None,
             t_samples: Optional[int] = None, seed: Optional[int] = None,
             micro_batch_size: Optional[int] = None, device: str = "cpu",
             warn=print, key: str = "CHECKPOINT", model=None) -> dict:
    """The report: the model, its step, the settings and each set's statistics. ``source``: a
    checkpoint (its run's eval settings and held-out sets are the defaults) or an ``llada
    export`` directory (the defaults of ``EvalConfig``; ``manifests`` needed). ``model``: the
    fp32 InferenceModel of ``source`` when the caller has loaded it already."""
    from framework.checkpoint.checkpointer import read_meta
    from framework.inference.model import load

    im = model or load(source, device, dtype=torch.float32, warn=warn, key=key)
    saved = read_meta(Path(im.source))["config"] if im.step is not None else {}
    changes = {"sequences": sequences, "t_samples": t_samples, "seed": seed,
               "micro_batch_size": micro_batch_size}
    cfg = from_data(EvalConfig, saved.get("eval") or {},
                    {k: v for k, v in changes.items() if v is not None}, key="eval")
    specs = _sets(list(manifests), saved.get("data") or {})
    held = []
    for i, v in enumerate(specs):
        where = f"--data {v.manifest}" if manifests else f"data.validation[{i}].manifest"
        shards = load_manifest(v.manifest, v.shards_url, key=where)
        check_tokenizer(shards, im.tokenizer.sha256, im.special, f"{im.tokenizer.path}", where)
        if shards.kind == "sft" and im.objective == "ar":
            raise ConfigError(f"{where}: {v.manifest} holds SFT pairs; an autoregressive model "
                              "is evaluated on pretraining data")
        # a diffusion model's evaluation follows the data: the bound of SFT responses given
        # their prompts (a pretrained model's too), or of whole sequences (an SFT model's too)
        kind = "ar" if im.objective == "ar" else ("sft" if shards.kind == "sft" else "pretrain")
        held.append(HeldOutSet.read(v.name, shards, cfg.sequences, kind))

    world = init_world(ParallelConfig(), device)  # the one load set up
    validator = Validator(cfg, held, world, im.model,
                          micro_batch_size=cfg.micro_batch_size or 32,
                          mask_id=im.mask_id, cross_entropy=vocab_cross_entropy,
                          shift=im.logit_shift)
    results = {}
    for h, v in zip(held, specs):
        results[h.name] = {"manifest": str(v.manifest), "sequences": int(h.tokens.shape[0]),
                           "seq_len": int(h.tokens.shape[1]), "text_bytes": h.text_bytes,
                           **validator.evaluate_set(h)}
    return {"checkpoint": im.source, "step": im.step, "objective": im.objective,
            "eval": {"t_samples": cfg.t_samples, "seed": cfg.seed,
                     "estimator": "exact" if im.objective == "ar" else "stratified"},
            "sets": results}


def table(report: dict) -> str:
    """The report as a few aligned lines: one per set, then its bound by mask ratio."""
    head = (f"{'set':<24} {'seqs':>6} {'loss':>9} {'± mc':>8} {'± seqs':>8} {'bpb':>8} "
            f"{'bpb -1st':>8}")
    step = f"step {report['step']}" if report["step"] is not None else "an export"
    how = ("the exact NLL" if report["eval"]["estimator"] == "exact" else
           f"{report['eval']['t_samples']} draws per sequence, seed {report['eval']['seed']}")
    lines = [f"{report['checkpoint']} ({step}), {how}", head, "-" * len(head)]
    for name, r in report["sets"].items():
        def cell(key: str, width: int) -> str:
            return f"{r[key]:>{width}.4f}" if key in r else f"{'n/a':>{width}}"
        lines.append(f"{name:<24} {r['sequences']:>6} {cell('loss', 9)} "
                     f"{cell('loss_mc_stderr', 8)} {cell('loss_seq_stderr', 8)} {cell('bpb', 8)} "
                     f"{cell('bpb_without_first', 8)}")
    for name, r in report["sets"].items():
        by = {k.split("/")[-1]: v for k, v in r.items() if k.startswith("loss_by_ratio/")}
        if by:
            lines.append(f"{name} by mask ratio: "
                         + "  ".join(f"{k} {v:.3f}" for k, v in by.items()))
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    from data_pipeline.files import atomic_write
    atomic_write(path, (json.dumps(report, indent=1) + "\n").encode())
