"""SFT data: conversations -> (tokens, prompt length) pairs; the collator masks responses only,
pads with EOS that count as response; the loss divides each sequence by its response length."""

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.collate import TrainBatch
from data_pipeline.sft import SFTCollator, read_sft_jsonl, sft_sample
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.config import ObjectiveConfig
from framework.training.objective import sft_loss


def write_jsonl(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def test_multi_turn_dialogue_gives_one_pair_per_assistant_turn(tmp_path, small_tokenizer, capfd):
    tok = load_tokenizer(small_tokenizer)
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "And 3+3?"},
                      {"role": "assistant", "content": "6"}]},
        {"prompt": "Say hi", "response": "hi"},
    ], extra_lines=["not json\n", '{"messages": [{"role": "user", "content": "no reply"}]}\n'])
    pairs = list(read_sft_jsonl(path, tok))
    assert len(pairs) == 3
    ids = tok.special_ids()
    first, second, single = pairs
    # the second pair's prompt holds the whole first exchange, answer included
    assert torch.equal(torch.from_numpy(second.tokens[:len(first.tokens)]),
                       torch.from_numpy(first.tokens))
    for ex, answer in ((first, "4"), (second, "6"), (single, "hi")):
        assert ex.tokens[0] == ids["bos"] and ex.tokens[-1] == ids["eot"]
        assert tok.decode(ex.tokens[ex.prompt_len:-1].tolist()) == answer
        assert ex.tokens[ex.prompt_len - 1] != ids["eot"]  # the prompt ends in the assistant header
    err = capfd.readouterr().err
    assert "chat.jsonl:3: not a conversation" in err and "chat.jsonl:4: not a conversation (no assistant turn)" in err


def test_collator_masks_responses_only_and_pads_them_with_eos(tmp_path, small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "short", "response": "a much longer answer than the other one"},
        {"prompt": "a longer prompt than the first one, with more words", "response": "ok"},
    ])
    examples = list(read_sft_jsonl(path, tok))
    seq_len = max(len(e.tokens) for e in examples) + 4  # every pair padded, the longest too
    rows = torch.from_numpy(np.stack([sft_sample(e, seq_len, tok.eos_id, np.uint16)
                                      for e in examples]).astype(np.int64))
    col = SFTCollator(ObjectiveConfig(), tok.mask_id)
    masked_prompt = masked_pad = 0
    for k in range(200):
        b = col(rows, torch.tensor([2 * k, 2 * k + 1]), k)
        assert isinstance(b, TrainBatch) and b.step == k
        assert b.targets.shape == (2, seq_len)
        for row, ex in enumerate(examples):
            prompt = slice(0, ex.prompt_len)
            assert torch.equal(b.targets[row, :len(ex.tokens)], torch.from_numpy(ex.tokens))
            assert torch.equal(b.noisy[row, prompt], b.targets[row, prompt])  # prompt intact
            masked_prompt += int(b.mask[row, prompt].sum())
            assert torch.all(b.targets[row, len(ex.tokens):] == tok.eos_id)
            masked_pad += int(b.mask[row, len(ex.tokens):].sum())
            assert b.norm[row] == seq_len - ex.prompt_len  # padding counts as response
        assert torch.all(b.noisy[b.mask] == tok.mask_id)
    assert masked_prompt == 0 and masked_pad > 0  # EOS padding is masked and trained on

    # and the prompt never enters the loss: the training loss's gradient is zero at every prompt
    # position, nonzero at masked response positions
    from framework.training.objective import LossByT, ObjectiveLoss, weighted

    b = col(rows, torch.tensor([0, 1]), 0)
    logits = torch.randn(*b.targets.shape, 64, requires_grad=True)
    targets = b.targets % 64
    loss = ObjectiveLoss(weighted(lambda x, y: F.cross_entropy(x, y, reduction="none")),
                         lambda _: None,
                         LossByT())(logits[b.mask], (targets, b.mask, b.p_mask, b.norm))
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, b.mask)
    for row, ex in enumerate(examples):
        assert not touched[row, :ex.prompt_len].any()


def test_sft_loss_divides_each_sequence_by_its_response_length():
    logits = torch.zeros(3, 5)  # uniform: CE = ln 5 at every position
    targets = torch.tensor([1, 2, 3])
    p = torch.tensor([0.5, 0.5, 0.25])  # positions 0, 1 of sequence 0; position 2 of sequence 1
    resp = torch.tensor([4.0, 4.0, 10.0])
    loss = sft_loss(logits, targets, p, resp, batch_size=2)
    expected = (2 * math.log(5) / 0.5 / 4 + math.log(5) / 0.25 / 10) / 2
    assert abs(loss.item() - expected) < 1e-6
