"""SGDStep (pipeline/stage2/heads/sgd.py) is clip_grad_norm_ + torch.optim.SGD, bit for bit."""
import pytest
import torch

from pipeline.stage2.heads.sgd import SGDStep


def _trajectory(use_library: bool, momentum: float, weight_decay: float, clip, steps: int = 12):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=gen).requires_grad_(True),
              torch.randn(3, generator=gen).requires_grad_(True)]
    data = [torch.randn(16, 5, generator=gen) for _ in range(steps)]
    lrs = [0.05 * (1 + i % 3) for i in range(steps)]  # the lr changes between steps, as the cosine schedule does
    if use_library:
        opt = torch.optim.SGD(params, lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
    else:
        step = SGDStep(params, momentum, weight_decay, clip)
    out = []
    for x, lr in zip(data, lrs):
        loss = ((x @ params[0].T).tanh().sum(1) ** 2).mean() + (params[1] ** 4).sum()
        if use_library:
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if use_library:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        else:
            step(lr)
            assert all(p.grad is None for p in params)  # zero_grad(set_to_none=True) after the step
        out.append([p.detach().clone() for p in params])
    return out


@pytest.mark.parametrize("momentum,weight_decay,clip", [
    (0.9, 0.0, 0.1),     # learned-ncm / multi-ncm / metric heads: momentum + total-norm clipping
    (0.9, 5e-4, None),   # crt / lws: weight decay, no clipping
    (0.0, 5e-4, 0.1),    # no momentum buffer
    (0.9, 0.0, 1e3),     # a threshold the norm never reaches: scale clamped at 1
])
def test_sgd_step_matches_clip_grad_norm_and_torch_sgd_bit_for_bit(momentum, weight_decay, clip):
    ours = _trajectory(False, momentum, weight_decay, clip)
    ref = _trajectory(True, momentum, weight_decay, clip)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), f"step {step}: max |diff| {(pa - pb).abs().max():.3g}"
    assert not torch.equal(ours[0][0], ours[-1][0])  # the parameters did move
