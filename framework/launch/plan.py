"""``llada plan RECIPE [overrides]``: a layout checked and sized before anything is launched.

For ``parallel.world_size`` GPUs and the recipe's tp x pp: the divisibility of heads, kv heads,
FFN, vocabulary, layers and batch; parameters per GPU (the largest pipeline stage); memory per GPU
for weights, gradients and optimizer state by ZeRO stage, plus an activation estimate; FLOPs per
step and the step time expected at an MFU: one measured on the GPU named by ``--gpu`` where
benchmarks/measured.json (written by benchmarks/train_step.py) has a record of that GPU, model
shape and sequence length, else the ``--mfu`` guess; an explicit ``--mfu`` always wins.

Memory model (bytes per parameter, the ZeRO paper's accounting): bf16 weights 2, gradients 2,
optimizer state 12 (fp32 master copy, Adam m and v); fp32: 4, 4, 8. ZeRO-1 divides the optimizer
state by the data-parallel size, ZeRO-2 the gradients too, ZeRO-3 the weights too.
Activations (bf16, SDPA/flash attention: no s x s term): per Transformer layer and micro-batch,
the tensors autograd keeps; one micro-batch per stage without pipelining, up to pp micro-batches
in flight on the first stage under 1F1B; with activation checkpointing a recomputed layer keeps
only its input. It is an estimate: allocator slack and communication buffers come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from framework.config import Config, ConfigError, ModelConfig, check_world
from framework.model.params import padded_vocab_size, param_table, total_params
from framework.parallel.layout import recompute_flags, stage_bounds
from framework.training.flops import FlopCounter
from llada_kernels.linear_cross_entropy import TRITON_CHUNK_ELEMENTS

GIB = 1024 ** 3
GUESSED_MFU = 0.4  # without a measurement: about what Megatron-LM publishes on H100s
# the model shape a measured.json record names (benchmarks/train_step.py writes it)
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
              "ffn_hidden_size", "vocab_size")
RECORD_KEYS = ("gpu", "model", "seq_len", "mfu", "date", "recipe")


def load_measured(path: Path) -> List[dict]:
    """The records of a measured.json: a list of objects with RECORD_KEYS; a file that is
    not one is a ConfigError naming it."""
    try:
        records = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the measurements: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON ({' '.join(str(e).split())})") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON list of benchmark records, got "
                          f"{type(records).__name__}")
    for i, r in enumerate(records):
        missing = [k for k in RECORD_KEYS if not isinstance(r, dict) or k not in r]
        if missing:
            raise ConfigError(f"{path}: record {i} lacks {', '.join(missing)}")
        if r["mfu"] is not None and not (isinstance(r["mfu"], (int, float))
                                         and 0 < r["mfu"] <= 1):
            raise ConfigError(f"{path}: record {i}: mfu must be in (0, 1] or null, got "
                              f"{r['mfu']!r}")
    return records


def find_measured(records: List[dict], gpu: str, model: ModelConfig,
                  seq_len: int) -> Optional[dict]:
    """The record of ``gpu`` (the torch.cuda device name) for this model shape and sequence
    length that has an MFU (CPU rows have none), the newest if several."""
    shape = {k: getattr(model, k) for k in MODEL_KEYS}
    found = [r for r in records if r["gpu"] == gpu and r["model"] == shape
             and r["seq_len"] == seq_len and r["mfu"] is not None]
    return max(found, key=lambda r: str(r["date"])) if found else None


@dataclass
class PieceParams:
    split: int  # divided across tensor-parallel ranks
    replicated: int  # every tensor-parallel rank holds all of it (norm gains)


def piece_params(cfg: ModelConfig) -> List[PieceParams]:
    """Parameters of each piece (embedding, layers..., head), whole-model sizes, from the
    parameter table."""
    pieces = [PieceParams(0, 0) for _ in range(cfg.num_layers + 2)]
    for p in param_table(cfg):
        if p.split_dim is None:
            pieces[p.piece].replicated += p.numel
        else:
            pieces[p.piece].split += p.numel
    return pieces


def layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, sp: bool) -> float:
    """bf16 tensors one layer keeps for backward, for ``tokens`` = micro-batch x seq_len."""
    h, d = cfg.hidden_size, cfg.kv_channels
    q = cfg.num_attention_heads * d  # = h unless model.head_dim says otherwise (Qwen3)
    # norm inputs, norm outputs (= inputs of qkv and fc1): whole hidden states, split only by SP
    full = 4 * h / (tp if sp else 1)
    # q, k, v; attention output (+ its input to the projection); fc1 out (gate, up), silu, product
    split = (q + 2 * cfg.num_kv_heads * d + 2 * q + 4 * cfg.ffn_hidden_size) / tp
    return 2.0 * tokens * (full + split)


def plan(cfg: Config, mfu: float, peak_flops: float, mfu_from: Optional[str] = None) -> str:
    """The plan's text; ``mfu_from``: where ``mfu`` came from (a measurement, a guess)."""
    par, tc, mc = cfg.parallel, cfg.train, cfg.model
    world = par.world_size
    dp = check_world(tc, par, world)
    accum = tc.global_batch_size // (tc.micro_batch_size * dp)
    bounds = stage_bounds(mc.num_layers, par.pp, par.pp_layers)
    pieces = piece_params(mc)
    stage_params = [sum(p.split / par.tp + p.replicated for p in pieces[a:b])
                    for a, b in zip(bounds, bounds[1:])]
    bf16 = tc.precision != "fp32"  # plan for the GPU: auto means bf16
    w_b, g_b, o_b = (2, 2, 12) if bf16 else (4, 4, 8)
    zero = cfg.deepspeed.zero_stage
    per_param = (w_b / (dp if zero >= 3 else 1) + g_b / (dp if zero >= 2 else 1)
                 + o_b / (dp if zero >= 1 else 1))

    # the mixed objective (objective.ar_loss_weight) carries each sequence twice per micro-batch
    tokens = tc.micro_batch_size * cfg.data.seq_len * (2 if cfg.objective.ar_loss_weight else 1)
    recompute = recompute_flags(mc.num_layers, bounds, tc.activation_checkpointing,
                                tc.checkpoint_layers)
    kept = layer_activation_bytes(mc, tokens, par.tp, par.sequence_parallel)
    checkpointed = 2.0 * tokens * mc.hidden_size / (par.tp if par.sequence_parallel else 1)
    vocab = padded_vocab_size(mc.vocab_size, mc.pad_vocab_to_multiple_of)
    if tc.fused_head and zero < 3:
        # llada_kernels/linear_cross_entropy.py on the GPU: one chunk's bf16 logits (two while the next
        # is made), the weight gradient's fp32 sum and the bf16 product added to it, and the
        # input gradient of the masked half
        head = (2 * TRITON_CHUNK_ELEMENTS * 2 + vocab / par.tp * mc.hidden_size * (4 + 2)
                + tokens * 0.5 * mc.hidden_size * 2)
    else:  # the masked half of the positions on average: bf16 logits and their fp32 copy
        head = tokens * 0.5 * vocab / par.tp * (2 + 4)
    in_flight = min(par.pp, accum)  # 1F1B: stage s holds pp - s micro-batches

    rows = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        layers = range(max(a, 1) - 1, min(b, mc.num_layers + 1) - 1)
        act = sum(checkpointed if recompute[i] else kept for i in layers)
        act = act * max(in_flight - s, 1) + (head if s == par.pp - 1 else 0)
        rows.append((s, len(layers), stage_params[s], stage_params[s] * w_b,
                     stage_params[s] * per_param, act))

    per_token = FlopCounter(mc, cfg.objective.kind, cfg.objective.ar_loss_weight > 0
                            ).expected_per_token(cfg.data.seq_len)
    flops_step = per_token * tc.global_batch_size * cfg.data.seq_len
    step_s = flops_step / (world * peak_flops * mfu)
    out = [
        f"llada plan: {total_params(mc) / 1e9:.3f}B parameters ({total_params(mc):,}), "
        f"{mc.num_layers} layers, vocabulary {mc.vocab_size} padded to {vocab}",
        f"layout: world {world} = tp {par.tp} x pp {par.pp} x dp {dp}"
        f"{' (sequence parallel)' if par.sequence_parallel else ''}; ZeRO-{zero}, "
        f"{'bf16' if bf16 else 'fp32'}; global batch {tc.global_batch_size} = "
        f"{tc.micro_batch_size} x {accum} accumulation x {dp} data-parallel; "
        f"checks passed (heads, kv heads, FFN, vocabulary, layers, batch)",
        "",
        "| stage | layers | params/GPU | weights GiB | weights+grads+optimizer GiB "
        "| activations GiB | total GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, n, params, weights, state, act in rows:
        out.append(f"| {s} | {n} | {params / 1e6:,.1f}M | {weights / GIB:.2f} | "
                   f"{state / GIB:.2f} | {act / GIB:.2f} | {(state + act) / GIB:.2f} |")
    out += [
        "",
        f"FLOPs per step: {flops_step:.3e} ({per_token:.3e} per token x "
        f"{tc.global_batch_size * cfg.data.seq_len:,} tokens; the head at half the positions, "
        f"the mean mask ratio)",
        f"expected step time at {100 * mfu:.0f}% MFU of {peak_flops / 1e12:.0f} TFLOP/s per GPU: "
        f"{step_s:.2f} s ({tc.global_batch_size * cfg.data.seq_len / step_s:,.0f} tokens/s)",
        *([f"MFU: {mfu_from}"] if mfu_from else []),
        "activations are an estimate (bf16, flash attention, 1F1B); allocator slack and "
        "communication buffers come on top",
    ]
    return "\n".join(out)


# benchmarks/train_step.py's measurements, beside the framework package in a checkout
MEASURED = Path(__file__).resolve().parents[2] / "benchmarks" / "measured.json"


def peak_and_mfu(cfg: Config, *, mfu: Optional[float], gpu: Optional[str],
                 peak_tflops: Optional[float], measured: Path) -> Tuple[float, float, str]:
    """``llada plan``'s peak (``gpu``'s datasheet figure, ``peak_tflops``, or the H100 SXM's)
    and MFU: an explicit ``mfu``, else the one measured on ``gpu`` for this model shape and
    sequence length (benchmarks/train_step.py's records in ``measured``), else the guess; and a
    line that says which."""
    from framework.training.flops import DENSE_BF16_PEAK, H100_SXM

    if gpu is not None and peak_tflops is not None:
        raise ConfigError("--gpu and --peak-tflops: give one (--gpu takes the GPU's datasheet "
                          "peak)")
    if gpu is not None and gpu not in DENSE_BF16_PEAK:
        raise ConfigError(f"--gpu {gpu!r}: unknown; known (torch.cuda device names): "
                          f"{', '.join(sorted(DENSE_BF16_PEAK))}")
    peak = (DENSE_BF16_PEAK[gpu] if gpu is not None else
            H100_SXM if peak_tflops is None else peak_tflops * 1e12)
    given = mfu is not None
    mfu = mfu if given else GUESSED_MFU
    how = "as given (--mfu)" if given else "guessed"
    if gpu is None:
        return peak, mfu, (f"{100 * mfu:.0f}% {how}; --gpu NAME takes a measured one from "
                           f"{measured} where it has one")
    # a checkout without measurements yet: the guess; a file named with --measured must exist
    records = ([] if measured == MEASURED and not MEASURED.exists()
               else load_measured(measured))
    found = find_measured(records, gpu, cfg.model, cfg.data.seq_len)
    if found is not None:
        what = (f"measured on {found['gpu']} on {found['date']} by benchmarks/train_step.py "
                f"({found['recipe']}, one GPU, micro-batch "
                f"{found.get('micro_batch_size', '?')} x {found['seq_len']}; {measured})")
        if given:
            return peak, mfu, (f"{100 * mfu:.0f}% as given (--mfu wins over the "
                               f"{100 * found['mfu']:.1f}% {what})")
        return peak, found["mfu"], f"{100 * found['mfu']:.1f}% {what}"
    return peak, mfu, (f"{100 * mfu:.0f}% {how}: {measured} has no measurement on "
                       f"{gpu} of this model shape at sequence length {cfg.data.seq_len}")
