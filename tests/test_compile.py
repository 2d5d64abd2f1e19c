"""torch.compile(optimizer.step) is unsupported: it warns once and runs the eager step."""

from __future__ import annotations

import warnings

import torch

from scalable_shampoo import Shampoo
from scalable_shampoo.optimizer import COMPILE_WARNING


def _pair():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
              for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [Shampoo(m.parameters(), lr=1e-2, precondition_frequency=3, block_size=8)
            for m in models]
    return models, opts


def test_compiled_step_warns_once_and_equals_the_eager_step():
    torch._dynamo.reset()
    (compiled_model, eager_model), (compiled_opt, eager_opt) = _pair()
    step = torch.compile(compiled_opt.step)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(7):  # two root steps
            x = torch.randn(5, 6, generator=gen)
            for model, run in ((compiled_model, step), (eager_model, eager_opt.step)):
                model.zero_grad()
                model(x).square().mean().backward()
                run()
    ours = [w for w in caught if str(w.message) == COMPILE_WARNING]
    assert len(ours) == 1
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, torch.zeros_like(a))
    assert compiled_opt.metrics()["root_computations"] > 0
