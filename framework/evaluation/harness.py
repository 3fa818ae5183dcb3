"""The lm-evaluation-harness model ``llada`` (importing this module registers it; ``llada
lm-eval ...`` runs the harness's own CLI with it registered). Needs the ``eval`` extra.

- ``loglikelihood``: the Monte Carlo estimate of framework/inference/likelihood.py (``mc_samples``
  draws, optional ``cfg_scale``), ``is_greedy`` from the prediction with the whole continuation
  masked;
- ``loglikelihood_rolling``: the bound on the whole text by the same estimator (its tokens as the
  continuation of the document start), in windows of the model's length, each window
  conditioned on the tokens before it that fit;
- ``generate_until``: the sampler (framework/inference/sampler.py), fast mode selectable
  (``cache``, ``threshold``), cut at the task's ``until`` strings; ``max_gen_toks`` rounded up to
  whole blocks.

Data parallel as the harness's Hugging Face model is, under ``torchrun`` (or ``accelerate
launch``): every process loads the model on its own device, the harness gives each its share of
the requests and gathers the results through ``all_gather`` / ``gather_object`` / ``barrier``
below (torch.distributed). Estimates are keyed by their tokens, so they do not depend on how the
requests were shared out. ``model_args``: ``pretrained`` (a checkpoint or an export directory),
``dtype``, ``mc_samples``, ``cfg_scale``, ``seed`` and the sampler's keys (``gen_length``,
``steps``, ``block_length``, ``remasking``, ``temperature``, ``cache``, ``refresh``,
``threshold``); the device and the batch size are the harness's own ``--device`` and
``--batch_size`` (rows per forward for the likelihood, prompts per batch for generation; the
harness's default is 1, so give one, e.g. 32). ``--device cuda:N`` or ``cuda`` is this process's
GPU (under torchrun its LOCAL_RANK's); the harness's default ``cuda:0`` on a machine without a GPU
means the CPU, as for its Hugging Face model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from framework.config import ConfigError
from framework.inference.likelihood import encode_pair, loglikelihoods
from framework.inference.model import load
from framework.inference.sampler import SamplerConfig, generate

_SAMPLER_KEYS = {f.name for f in dataclasses.fields(SamplerConfig)} - {"batch_size", "seed"}


@register_model("llada")
class LLaDAHarnessModel(LM):
    def __init__(self, pretrained: str, device: Optional[str] = None, dtype: Optional[str] = None,
                 mc_samples: int = 128, cfg_scale: float = 0.0, seed: int = 0,
                 batch_size=32, max_batch_size=None, **sampler):
        super().__init__()
        unknown = sorted(set(sampler) - _SAMPLER_KEYS)
        if unknown:
            raise ConfigError(f"--model_args: unknown key(s) {', '.join(unknown)} (known: "
                              f"pretrained, device, dtype, mc_samples, cfg_scale, seed, "
                              f"batch_size, {', '.join(sorted(_SAMPLER_KEYS))})")
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"--model_args dtype: float32, bfloat16 or float16, got {dtype!r}")
        self.mc_samples, self.cfg_scale, self.seed = int(mc_samples), float(cfg_scale), int(seed)
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = 32 if auto else int(batch_size)
        if self.batch_size < 1 or self.mc_samples < 1:
            raise ConfigError(f"--batch_size {batch_size} / mc_samples {mc_samples}: must be >= 1")
        self.sampler = dict(sampler)
        self._sampler_for({})  # bad sampler keys fail here, before any request runs
        self.im = load(pretrained, _device_choice(device),
                       getattr(torch, dtype) if dtype else None, key="pretrained")
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        self._world_size = dist.get_world_size() if dist.is_initialized() else 1

    @property
    def device(self) -> torch.device:  # the harness puts its gather tensors here
        return self.im.device

    @property
    def tokenizer_name(self) -> str:
        return f"llada-{self.im.tokenizer.sha256[:16]}"

    # -- data parallel: the harness's hooks, through torch.distributed (gloo or nccl)
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor.reshape(-1)
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat([p.reshape(-1) for p in parts])

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier()

    # -- requests
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [encode_pair(self.im, ctx, cont) for ctx, cont in (r.args for r in requests)]
        est = loglikelihoods(self.im, pairs, self.mc_samples, self.batch_size, self.cfg_scale,
                             self.seed)
        return [(e.loglik, e.greedy) for e in est]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        room = self.im.max_length - len(self.im.document_start())
        for (text,) in (r.args for r in requests):
            ids = self.im.tokenizer.encode(text)
            if not ids:
                out.append(0.0)
                continue
            # windows of the model's length: each scores its own tokens given what precedes it
            window = max(1, room // 2) if len(ids) > room else room
            pairs = [(ids[max(0, s + window - room):s], ids[s:s + window])
                     for s in range(0, len(ids), window)]
            # the document start precedes the text once, not every window
            est = loglikelihoods(self.im, pairs[:1], self.mc_samples, self.batch_size,
                                 self.cfg_scale, self.seed)
            if pairs[1:]:
                est += loglikelihoods(self.im, pairs[1:], self.mc_samples, self.batch_size,
                                      self.cfg_scale, self.seed, start=[])
            out.append(sum(e.loglik for e in est))
        return out

    def _sampler_for(self, kwargs: dict) -> SamplerConfig:
        """The sampler for one request's generation kwargs: ``max_gen_toks`` rounded up to
        whole blocks, the steps to a multiple of the blocks, the task's temperature when it
        samples."""
        settings = dict(self.sampler)
        wanted = int(kwargs.get("max_gen_toks", settings.get("gen_length", 128)))
        if kwargs.get("do_sample") and "temperature" in kwargs:
            settings["temperature"] = float(kwargs["temperature"])
        block = int(settings.get("block_length", wanted))
        gen_length = block * math.ceil(wanted / block)
        blocks = gen_length // block
        steps = int(settings.get("steps", gen_length))
        settings.update(gen_length=gen_length, block_length=block,
                        steps=blocks * max(1, math.ceil(steps / blocks)))
        return SamplerConfig(**settings, seed=self.seed, batch_size=self.batch_size)

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Requests of the same settings go through the sampler together, in batches."""
        jobs = []
        for ctx, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = self._sampler_for(kwargs)
            prompt = self.im.document_start() + self.im.tokenizer.encode(ctx)
            prompt = prompt[max(0, len(prompt) + cfg.gen_length - self.im.max_length):]
            wanted = int(kwargs.get("max_gen_toks", cfg.gen_length))
            jobs.append((ctx, until, cfg, prompt, wanted))
        texts: List[Optional[str]] = [None] * len(jobs)
        groups: dict = {}
        for j, (_, _, cfg, _, _) in enumerate(jobs):
            groups.setdefault(dataclasses.astuple(cfg), []).append(j)
        for members in groups.values():
            cfg = jobs[members[0]][2]
            done = generate(self.im, [jobs[j][3] for j in members], cfg)
            for j, c in zip(members, done):
                texts[j] = self.im.tokenizer.decode(c.tokens[:jobs[j][4]])  # whole blocks ran
        out = []
        for (ctx, until, _, _, _), text in zip(jobs, texts):
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (ctx, {"until": until}), text)
        return out


def _device_choice(device: Optional[str]) -> str:
    """The harness's --device as ours: cpu, cuda (this process's GPU) or auto."""
    if device in (None, "", "auto"):
        return "auto"
    if device == "cpu":
        return "cpu"
    if str(device).startswith("cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    raise ConfigError(f"--device: {device!r} is not cpu, cuda, cuda:N or auto")
