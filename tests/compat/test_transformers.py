"""Hugging Face transformers built from tiny configs (no download): GPT-2 language modelling with the default (SDPA) and
the eager attention, and BERT sequence classification, wrapped in a small LightningModule with AdamW, attention and
hidden dropout on.

The batched path (``num_shadows=4``, ``vectorize="auto"``) must not silently draw other dropout masks than the real
model: CPU dropout fills its mask in memory order, so the same RNG state gives another mask for a non-contiguous
attention tensor than for its batched copy. At ε = 0 the four shadows follow the real model to float rounding, or
the probe falls back to one at a time (exact), or it says it cannot be trusted.

``transformers`` is imported only when a model is built: without it these cases skip (``Case.requires``), and the
file still imports, so the README's table lists them.
"""

import importlib

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from harness import (
    Case,
    assert_probe_healthy,
    assert_untrusted_is_said,
    check_observation_never_perturbs,
    fit,
    flat_norm,
)
from lightning_chaos import ChaosProbe

VOCAB, LENGTH = 50, 12


class HuggingFace(L.LightningModule):
    """Wraps a Hugging Face model whose forward returns ``.loss`` when given labels; AdamW."""

    def __init__(self, build):
        super().__init__()
        self.model = build()

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        loss = self.model(input_ids=ids, labels=labels).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def gpt2(attention):
    def build():
        transformers = importlib.import_module("transformers")
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                                         resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                         attn_implementation=attention)
        return transformers.GPT2LMHeadModel(config)

    return lambda: HuggingFace(build)


def bert():
    def build():
        transformers = importlib.import_module("transformers")
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        return transformers.BertForSequenceClassification(config)

    return lambda: HuggingFace(build)


def tokens(labels):
    """64 random sequences of 12 tokens in 4 shuffled batches; labels: the tokens themselves (language modelling) or
    one of 3 classes."""

    def data():
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(VOCAB, (64, LENGTH), generator=g)
        targets = ids if labels == "tokens" else torch.randint(3, (64,), generator=g)
        return {"train_dataloaders": DataLoader(TensorDataset(ids, targets), batch_size=16, shuffle=True)}

    return data


FAMILY = "Hugging Face transformers"
SDPA_DROPOUT = "SDPA attention with dropout cannot replay the real dropout mask batched: the shadows run one at a time."

CASES = [
    Case("transformers-GPT2LMHeadModel-sdpa", gpt2("sdpa"), tokens("tokens"), requires=("transformers",),
         status="works with a note", note=SDPA_DROPOUT,
         setup="`GPT2LMHeadModel` (1 layer, 16 wide, vocab 50), SDPA attention, dropout 0.1, AdamW"),
    Case("transformers-GPT2LMHeadModel-eager-attention", gpt2("eager"), tokens("tokens"), requires=("transformers",),
         status="works", setup='the same with `attn_implementation="eager"`',
         note="Runs batched: 4 batched shadows follow the real model to rounding."),
    Case("transformers-BertForSequenceClassification", bert(), tokens("classes"), requires=("transformers",),
         status="works with a note", note=SDPA_DROPOUT,
         setup="`BertForSequenceClassification` (1 layer, 16 wide), SDPA attention and hidden dropout 0.1, AdamW"),
]



@pytest.mark.parametrize("case", CASES, ids=str)
def test_batched_shadows_draw_the_real_dropout_masks_or_say_so(case):
    run = fit(case, ChaosProbe(epsilon=0.0, num_shadows=4, vectorize="auto", log_every_n_steps=1))
    assert_probe_healthy(run)
    assert_untrusted_is_said(run)
    if run.probe.trusted:
        bound = 1e-5 * flat_norm(run.params)  # float rounding of a batched kernel, not another mask (≈ 1e-2 here)
        assert run.probe.distances.max().item() <= bound, (
            f"trusted, but the ε = 0 batched shadows left the real model by {run.probe.distances.max().item():.3e}"
        )
    else:
        assert run.warned(r"UNTRUSTED|untrusted|dropout|mask")
    check_observation_never_perturbs(case, ChaosProbe(num_shadows=4, vectorize="auto"), require_trusted=False)
