"""EMA: the warm-up of its decay and the average itself."""

from __future__ import annotations

import pytest
import torch

from training.ema import EMA


def test_decay_warms_up_then_holds():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.99, warmup=10)
    decays = []
    for _ in range(2000):
        decays.append(ema.current_decay())
        ema.updates += 1
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(2 / 11)
    assert max(decays) == 0.99 and decays[-1] == 0.99 and decays == sorted(decays)


def test_average_follows_the_weights():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.5, warmup=1)  # decay min(0.5, (1+n)/(1+n)) = 0.5 from the start
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 3), 0.75))
    restored = EMA(model, 0.5, 1)
    restored.load_state_dict(ema.state_dict(), ema.updates)
    assert restored.updates == 2 and torch.equal(restored.state_dict()["weight"], ema.state_dict()["weight"])
    with pytest.raises(KeyError, match="EMA weights lack 'weight'"):
        restored.load_state_dict({}, 0)
