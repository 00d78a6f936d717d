"""Every activation, dense and MoE: a tiny model overfits one fixed batch (loss < 0.1 nats)."""

import pytest
import torch

from polycom import ACTIVATIONS, no_weight_decay_names
from polycom.models import Transformer, get_preset

VOCAB, SEQ, BATCH, MAX_STEPS = 128, 32, 8, 300
SHAPE = dict(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, ffn_base_width=96, max_seq_len=SEQ)


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def overfit(model: Transformer, tokens: torch.Tensor) -> tuple[float, int]:
    """Adam on ``tokens`` until the loss is below 0.1 nats or ``MAX_STEPS``; returns (loss, steps)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    step = 0
    while step < MAX_STEPS:
        step += 1
        out = model(inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        (loss + out.aux_loss).backward()
        optimizer.step()
        if loss.item() < 0.1:
            break
    return loss.item(), step


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_tiny_model_overfits_one_batch(activation, kind):
    torch.manual_seed(0)
    if kind == "dense":
        cfg = get_preset("tiny", activation=activation, **SHAPE)
    else:
        cfg = get_preset("moe-tiny", activation=activation, moe={"num_experts": 4, "top_k": 2}, **SHAPE)
    model = Transformer(cfg)
    coefficients = {
        n: p.detach().clone() for n, p in model.named_parameters() if n in no_weight_decay_names(model)
    }
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    initial = torch.nn.functional.cross_entropy(
        model(tokens[:, :-1]).logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
    ).item()
    loss, steps = overfit(model, tokens)
    assert initial > 4.0  # ~ln(128) = 4.85 at init: the batch is not trivially predictable
    assert loss < 0.1, f"{activation}/{kind}: loss {loss:.3f} after {steps} steps"
    assert (coefficients != {}) == ACTIVATIONS[activation].has_parameters
    for name, before in coefficients.items():  # the PolyCom coefficients are trained too
        assert not torch.equal(dict(model.named_parameters())[name], before), name
