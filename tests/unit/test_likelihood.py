"""The Monte Carlo conditional log-likelihood: unbiased against the exact value by enumerating
every mask, independent of batching and padding, and multiple choice read from a file."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.errors import DataConfigError
from framework.config import ConfigError
from framework.inference.likelihood import (encode_pair, loglikelihoods, multiple_choice,
                                            read_choices)
from tests.unit.inference_helpers import full_logits, tiny_model


@pytest.fixture(scope="module")
def im(world, small_tokenizer):
    return tiny_model(small_tokenizer, seed=3)


def exact_bound(im, context, continuation, cfg_scale=0.0):
    """E over l ~ U(1..|r|) and the C(|r|, l) masks of l answer tokens of |r|/l x summed CE,
    by enumeration: the value the estimator's mean must reach."""
    seq = im.document_start() + context + continuation
    off, n = len(seq) - len(continuation), len(continuation)
    logits_of = full_logits(im)
    total = 0.0
    for l in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), l))
        acc = 0.0
        for subset in subsets:
            x = torch.tensor([seq])
            pos = [off + j for j in subset]
            x[0, pos] = im.mask_id
            logits = logits_of(x)[0]
            if cfg_scale:
                u = x.clone()
                u[0, :off] = im.mask_id
                un = logits_of(u)[0]
                logits = un + (cfg_scale + 1) * (logits - un)
            ce = F.cross_entropy(logits[pos].double(), torch.tensor(seq)[pos], reduction="sum")
            acc += n / l * float(ce)
        total += acc / len(subsets) / n
    return total


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_the_estimator_is_unbiased(im, cfg_scale):
    context, continuation = im.tokenizer.encode("return self"), [17, 42, 99, 7]
    exact = exact_bound(im, context, continuation, cfg_scale)
    draws = [loglikelihoods(im, [(context, continuation)], samples=4, batch_size=64,
                            cfg_scale=cfg_scale, seed=s)[0] for s in range(150)]
    values = np.array([-d.loglik for d in draws])
    sem = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - exact) < 4 * sem + 1e-9, (values.mean(), exact, sem)
    # each estimate's own error bar is of the size of the spread of the estimates
    assert 0.5 < np.mean([d.stderr for d in draws]) / values.std(ddof=1) < 3


def test_estimates_do_not_depend_on_the_batch(im):
    pairs = [(im.tokenizer.encode(c), im.tokenizer.encode(r)) for c, r in
             [("import", " os"), ("def f(x):\n    return", " x + 1"), ("a = [", "1, 2, 3]")]]
    together = loglikelihoods(im, pairs, samples=16, batch_size=20)
    for pair, est in zip(pairs, together):
        alone = loglikelihoods(im, [pair], samples=16, batch_size=7)[0]
        assert alone.loglik == pytest.approx(est.loglik, rel=1e-4)
        assert alone.greedy == est.greedy
    assert all(e.loglik < 0 and e.stderr > 0 for e in together)


def test_encode_pair_moves_the_context_spaces_to_the_continuation(im):
    ctx, cont = encode_pair(im, "x = ", "value")
    assert im.tokenizer.decode(ctx + cont) == "x = value"
    assert ctx == im.tokenizer.encode("x =")


def test_multiple_choice_picks_the_highest_estimate(im, tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"context": "import", "choices": [" os", " sys", " re"], "gold": 0},
            {"context": "def f(", "choices": ["self):", "x):"], "gold": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = multiple_choice(im, read_choices(path), samples=8, batch_size=16)
    assert report["questions"] == 2
    for item in report["items"]:
        assert item["pred"] == int(np.argmax(item["loglik"]))
    assert report["acc"] == np.mean([i["pred"] == i["gold"] for i in report["items"]])


@pytest.mark.parametrize("line, what", [
    ("{not json", "not JSON"),
    ('{"context": "a", "choices": ["b"], "gold": 0}', "two or more"),
    ('{"context": "a", "choices": ["b", "c"], "gold": 2}', "gold"),
    ('{"choices": ["b", "c"], "gold": 0}', "context"),
])
def test_a_malformed_choices_line_is_named(tmp_path, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "gold": 0}\n' + line + "\n")
    with pytest.raises((ConfigError, DataConfigError), match=rf"bad.jsonl:2: .*{what}"):
        read_choices(path)
