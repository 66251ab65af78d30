"""How the tests compare floats.

Bit for bit (``torch.equal``) only where both sides are the same computation in the same process: the same
forward twice, tensors read back from a file this process wrote, a state dict compared to the file it was saved to.
Anything computed two different ways (padded vs alone, packed vs padded, peftlab vs peft, merged vs unmerged,
three adapters in a batch vs two, a fixture written by another process or library version) goes through
``assert_close``, with a tolerance relative to the size of the values compared."""

import torch

FLOAT32 = 1e-4
"""Relative tolerance for float32 results computed two different ways. float32 keeps 24 bits (eps ~ 1.2e-7); a
different summation order over K terms (another BLAS kernel, another blocking for another shape) moves a result by up
to about K * eps relative, and that compounds through the layers. Measured across machines here: up to ~5e-6 relative
(2.7e-5 on bitune-qwen2 logits of magnitude 5.2; 1.9e-6 to 7.9e-6 on the v1 fixtures' logits of magnitude ~5).
1e-4 of the largest value is ~20x the worst seen, and still well below every effect the tests detect (an adapter, a
wrong route, a shifted prompt or a missing term moves logits by more than 1e-3 of their size)."""


def assert_close(got, want, what="", rel=FLOAT32):
    """Assert max|got - want| <= rel * max(1, max|want|): ``got`` equals ``want`` up to float rounding, measured
    against the largest value of ``want`` (and never below ``rel`` itself, so values near 0 need not match better
    than 1 would). ``got`` and ``want``: tensors or numbers of the same shape; ``what`` names them in the failure."""
    got = torch.as_tensor(got).detach().to("cpu", torch.float64)
    want = torch.as_tensor(want).detach().to("cpu", torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} against {tuple(want.shape)}"
    gap = (got - want).abs()
    worst = gap.max().item()
    scale = max(1.0, want.abs().max().item())
    allowed = rel * scale
    if not worst <= allowed:  # NaN fails too
        where = tuple(int(i) for i in torch.unravel_index(gap.nan_to_num(float("inf")).argmax(), gap.shape))
        raise AssertionError(f"{what}: worst |got - want| = {worst:.3g} at {where} (got {got[where].item():.6g}, "
                             f"want {want[where].item():.6g}); allowed {allowed:.3g} = {rel:g} * max(1, "
                             f"max|want| = {want.abs().max().item():.3g})")
