"""``llada prepare --sft``: conversations -> SFT shards, one (prompt, response) pair per sample in
the layout of data_pipeline/sft.py (``sft_sample``: the prompt length, then the pair's tokens
padded with EOS to seq_len), written by pretraining's machinery (data_pipeline/prepare.py): the
output cleared unless up to date, the samples shuffled into shards by a seeded permutation, sha256
per shard, the manifest (``"kind": "sft"``) last. Same inputs, byte-identical shards.

Inputs: JSONL conversations, read as ``read_sft_jsonl`` reads them (bad lines skipped, counted and
listed in skipped-inputs.txt), and ``stdlib-sft``, a set made from the embedded corpus: every
function of the standard library with a docstring, methods included, gives the prompt "its
signature and docstring" and the response "the rest of its body", as source text; files that do
not parse are skipped and counted. The tokenizer is always given (the fine-tuned model's), never
trained.

A pair longer than seq_len is dropped (``sft_overflow=skip``) or cut to seq_len tokens, losing its
response's end (``truncate``); one whose prompt alone leaves no room for a response token is
dropped either way; all counted. Held-out split (``holdout_fraction``): a conversation's pairs
all go to one split, chosen by the seeded hash of the conversation (prepare's ``held_out``).
"""

from __future__ import annotations

import ast
import functools
import time
import tokenize
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from data_pipeline.config import PrepareConfig
from data_pipeline.corpus import Report, is_jsonl
from data_pipeline.errors import DataConfigError
from data_pipeline.parts import sample_key
from data_pipeline.prepare import (HOLDOUT_DIR, SKIPPED_FILE, Packer, dataset_tokenizer,
                                   fingerprint, held_out, input_files, manifest_of,
                                   reuse_or_clear, sample_dtype, skipped_lines, split_packers,
                                   warn_skipped, write_dataset)
from data_pipeline.shards import MANIFEST
from data_pipeline.sft import (ChatFormat, SFTExample, _messages, conversation_record,
                               read_conversations, sft_sample)

SKIP_KINDS = ("bad_lines", "unreadable_files", "unparsable_files", "too_long")  # the warning's
PARSE_ERRORS = (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError)


def _lines(lines: List[str], indent: int) -> str:
    """Source lines as one text, each without its leading whitespace up to ``indent`` columns
    (a string's lines may start further left), and without blank lines around."""
    out = [line[min(indent, len(line) - len(line.lstrip())):] for line in lines]
    while out and not out[0].strip():
        out.pop(0)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def function_pairs(source: str) -> Iterator[Tuple[int, str, str]]:
    """(line, prompt, response) of every function with a docstring in a module's source, in
    source order: the prompt its signature line(s) and docstring, the response the rest of its
    body, both as source text without the function's own indentation (so that prompt, a newline
    and response are the function's source as a top-level one). SyntaxError where it does not
    parse."""
    with warnings.catch_warnings():  # e.g. invalid escape sequences in old test files
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    lines = source.split("\n")  # ast numbers lines by "\n" (a form feed is not one)
    functions = sorted((n for n in ast.walk(tree)
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                       key=lambda n: (n.lineno, n.col_offset))
    for fn in functions:
        if ast.get_docstring(fn, clean=False) is None:
            continue
        doc, rest = fn.body[0], fn.body[1:]
        # nothing but a docstring, or code on the docstring's last line: no clean cut
        if not rest or rest[0].lineno <= doc.end_lineno:
            continue
        prompt = _lines(lines[fn.lineno - 1:doc.end_lineno], fn.col_offset)
        response = _lines(lines[doc.end_lineno:fn.end_lineno], fn.col_offset)
        if response:
            yield fn.lineno, prompt, response


def _code_conversations(path: Path, counts: Counter, report: Report
                        ) -> Iterator[Tuple[str, List[dict]]]:
    """stdlib-sft: (where, messages) of each function pair of one module."""
    try:
        with tokenize.open(path) as f:  # its encoding cookie; universal newlines
            pairs = list(function_pairs(f.read()))
    except PARSE_ERRORS as e:
        counts["unparsable_files"] += 1
        report("unparsable_files", f"{path}: does not parse ({type(e).__name__}: "
               f"{str(e).splitlines()[0] if str(e) else ''}); skipped")
        return
    for line, prompt, response in pairs:
        yield f"{path}:{line}", _messages({"prompt": prompt, "response": response})


def conversations(files: List[Path], counts: Counter, report: Report
                  ) -> Iterator[Tuple[str, List[dict]]]:
    """(where, messages) of every conversation of the inputs, in input order: a JSONL file's
    lines, or (stdlib-sft: a module) its functions."""
    for path in files:
        counts["files"] += 1
        if is_jsonl(path):
            yield from read_conversations(path, counts, report)
        else:
            yield from _code_conversations(path, counts, report)


def fit(ex: SFTExample, cfg: PrepareConfig, counts: Counter) -> Optional[SFTExample]:
    """The pair as stored: whole when it fits seq_len, cut to it (``truncate``, and only where
    the prompt leaves room for a response token), else None; counted."""
    if len(ex.tokens) <= cfg.seq_len:
        return ex
    if cfg.sft_overflow == "truncate" and ex.prompt_len < cfg.seq_len:
        counts["truncated"] += 1
        return SFTExample(ex.tokens[:cfg.seq_len], ex.prompt_len)
    counts["too_long"] += 1
    return None


def _pack(cfg: PrepareConfig, fmt: ChatFormat, files: List[Path], packers: Tuple[Packer, Packer],
          counts: Counter, skipped: List[str]) -> None:
    """Every pair of the inputs as stored, into the split of its conversation (training, held
    out); the pairs that do not fit named in ``skipped``."""
    for where, messages in conversations(files, counts, lambda kind, msg: skipped.append(msg)):
        held = held_out(conversation_record(messages), cfg.holdout_fraction, cfg.holdout_seed)
        split = "held_" if held else ""  # the prefix of the split's counts
        counts[f"{split}conversations"] += 1
        for turn, ex in enumerate(fmt.pairs(messages), 1):
            stored = fit(ex, cfg, counts)
            if stored is None:
                skipped.append(f"{where}: turn {turn} has {len(ex.tokens)} tokens (prompt "
                               f"{ex.prompt_len}), more than prepare.seq_len={cfg.seq_len}; "
                               "skipped")
                continue
            counts[f"{split}pairs"] += 1
            counts[f"{split}pair_tokens"] += len(stored.tokens)
            packer = packers[held]
            packer.add(sft_sample(stored, cfg.seq_len, fmt.ids["eos"], packer.dtype))


def prepare_sft(cfg: PrepareConfig, log=print) -> dict:
    """Prepare (or find up to date) the SFT dataset cfg describes; returns its manifest."""
    files = input_files(cfg)
    out = Path(cfg.output)
    t0 = time.perf_counter()
    fp = fingerprint(cfg, files)
    done = reuse_or_clear(cfg, fp, log)
    if done is not None:
        return done
    tok = dataset_tokenizer(cfg, files)
    fmt = ChatFormat(tok)  # refuses a tokenizer without the chat tokens
    counts: Counter = Counter()
    skipped: List[str] = []  # one line per skipped input or pair, written to SKIPPED_FILE
    key = functools.partial(sample_key, part=0, parts=1)  # its place in the input order
    train, held = split_packers(cfg, cfg.seq_len + 1, sample_dtype(cfg, tok.vocab_size), key,
                                sample_tokens=cfg.seq_len)
    try:
        _pack(cfg, fmt, files, (train, held), counts, skipped)
        train.close()
        held.close()
    finally:
        train.abort()
        held.abort()
    _check_not_empty(cfg, counts, train.samples, held.samples)
    sources = {k: counts[k] for k in ("files", "conversations", "pairs", "pair_tokens",
                                      "truncated", *SKIP_KINDS)}
    manifest = manifest_of(cfg, cfg.name, train.shards, None, tok, fp, sources)
    held_counts = {"conversations": counts["held_conversations"], "pairs": counts["held_pairs"]}
    held_manifest = manifest_of(cfg, f"{cfg.name}-holdout", held.shards, None, tok, fp,
                                {**held_counts, "pair_tokens": counts["held_pair_tokens"]})
    where = write_dataset(cfg, manifest, held_manifest, held_counts, skipped_lines(skipped))
    warn_skipped(skipped, counts, SKIP_KINDS, out / SKIPPED_FILE)
    log(f"llada prepare: {train.samples} SFT pairs (sequences of {cfg.seq_len} tokens) in "
        f"{len(train.shards)} shards from {counts['conversations']} conversations in "
        f"{counts['files']} files ({counts['too_long']} too long, {counts['truncated']} "
        f"truncated), {time.perf_counter() - t0:.1f}s; {where}")
    if cfg.holdout_fraction > 0:
        log(f"llada prepare: held out {counts['held_conversations']} conversations "
            f"({cfg.holdout_fraction:g} by hash): {held.samples} pairs in {len(held.shards)} "
            f"shards; {out / HOLDOUT_DIR / MANIFEST}")
    return manifest


def _check_not_empty(cfg: PrepareConfig, counts: Counter, train: int, held: int) -> None:
    if not train:
        raise DataConfigError(
            f"prepare.inputs: no (prompt, response) pair to train on in {counts['files']} files "
            f"({counts['conversations']} conversations, {counts['too_long']} pairs longer than "
            f"prepare.seq_len={cfg.seq_len}, {counts['bad_lines']} bad lines)")
    if cfg.holdout_fraction > 0 and not held:
        raise DataConfigError(
            f"prepare.holdout_fraction: {cfg.holdout_fraction} held out "
            f"{counts['held_conversations']} conversations and no pair; hold out more")
