"""Sequence classification pools where transformers 4.53.3 pools: at the rightmost token that is not pad_token_id.

Classifiers fine-tuned with pad = eos on texts that end in eos were trained under that rule; pooling at the last
position the attention mask marks real (the eos itself) gives other logits. Oracle: transformers'
GPTBigCodeForSequenceClassification on the same checkpoint and inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigcode_deploy.exporter.checkpoint import load_model
from bigcode_deploy.exporter.export import export_bundle
from bigcode_deploy.exporter.model import last_token_index
from bigcode_deploy.runtime.progress import quiet

PAD = EOS = 7  # pad = eos, as GPTBigCode classifiers are commonly fine-tuned
FP32_ATOL = 1e-5


def texts_ending_in_pad(vocab_size: int, pad_slot_id: int):
    """A left-padded batch (B, T) whose texts end in one or two eos (= pad) ids, with the attention mask; pad slots
    hold pad_slot_id. Returns (ids, mask, index of each row's last token that is not eos)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for length, trailing in ((6, 1), (4, 2), (3, 1)):
        body = torch.randint(8, vocab_size, (length,), generator=g)  # ids 8.. never equal PAD
        rows.append(torch.cat([body, torch.full((trailing,), EOS)]))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_slot_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    last_text = []
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
        last_text.append(T - 1 - int((r == EOS).sum()))
    return ids, mask, torch.tensor(last_text)


@pytest.fixture
def classifier(hf_checkpoint):
    return hf_checkpoint("sequence-classification", pad_token_id=PAD, eos_token_id=EOS, num_labels=3)


def test_text_ending_in_pad_pools_like_transformers(classifier):
    hf_model, model_dir = classifier
    ours, config = load_model(model_dir, task="sequence-classification")
    ids, mask, last_text = texts_ending_in_pad(config.vocab_size, pad_slot_id=PAD)  # as a tokenizer pads
    assert last_token_index(ids, mask, PAD).tolist() == last_text.tolist()
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).logits
        actual, _ = ours(ids, mask)
        # What the mask rule would give (pooling at the trailing eos): the test can tell the two rules apart.
        hidden, _ = ours.transformer(ids, mask)
        at_mask_end = ours.score(hidden[:, -1])
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=0)
    assert (at_mask_end - expected).abs().max() > 100 * FP32_ATOL


def test_pad_slots_count_as_padding_whatever_id_they_hold(classifier):
    """Our runtime left-pads with id 0: the mask marks those slots, so the result is transformers' for its inputs."""
    hf_model, model_dir = classifier
    ours, config = load_model(model_dir, task="sequence-classification")
    ids, mask, _ = texts_ending_in_pad(config.vocab_size, pad_slot_id=PAD)
    zero_padded = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).logits
        actual, _ = ours(zero_padded, mask)
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=0)


def test_without_pad_token_id_the_mask_rule(hf_checkpoint):
    hf_model, model_dir = hf_checkpoint("sequence-classification", pad_token_id=None, num_labels=2)
    ours, config = load_model(model_dir, task="sequence-classification")
    ids = torch.tensor([[11, 12, 13, 0]])
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits  # transformers: the last position (batch 1 only)
        actual, _ = ours(ids, torch.ones_like(ids))
        padded, _ = ours(
            torch.tensor([[0, 0, 11, 12, 13, 0], [5, 6, 7, 8, 9, 10]]), torch.tensor([[0, 0] + [1] * 4] + [[1] * 6])
        )
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(padded[:1], expected, atol=FP32_ATOL, rtol=0)  # left padding ignored by the mask


def test_exported_graph_pools_like_transformers(classifier, tmp_path):
    import onnxruntime as ort

    hf_model, model_dir = classifier
    bundle = export_bundle(model_dir, tmp_path / "b", task="sequence-classification", check=False, progress=quiet)
    ids, mask, _ = texts_ending_in_pad(hf_model.config.vocab_size, pad_slot_id=PAD)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]  # the I/O contract unchanged
    logits = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
