"""AttentionBlock's q/k/v layout: the same numbers as plain multi-head attention computed straight
from the NCHW conv output, and the fused CPU SDPA kernel instead of the unfused math path. CPU
only, small shapes, a few seconds in all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from spatialvae.model import AttentionBlock

FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"
MATH = "aten::_scaled_dot_product_attention_math"
SHAPES = [(16, 1), (16, 4), (8, 1), (8, 4)]  # (side, heads): the seed model's 16x16 and the smoke preset's 8x8
SHAPE_IDS = [f"{s}x{s}-{h}head" for s, h in SHAPES]


def old_layout(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's forward with q, k, v permuted straight out of the NCHW conv output (the block's
    earlier layout), from the same weights: HW, not head_dim, is their unit-stride axis."""
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x)).reshape(b, 3, block.heads, c // block.heads, h * w)  # (B, 3, heads, d, HW)
    q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # each (B, heads, HW, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
    return x + block.proj(out.transpose(2, 3).reshape(b, c, h, w))


def make_block(side: int, heads: int, ch: int = 32, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    block = AttentionBlock(ch, heads=heads, groups=8)
    for p in block.parameters():  # non-trivial weights everywhere (GroupNorm starts at 1 / 0)
        torch.nn.init.normal_(p, std=0.2)
    return block, torch.randn(batch, ch, side, side)


def sdpa_ops(fn) -> set:
    """Names of the SDPA kernels (forward and backward) that ran inside fn."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if "scaled_dot_product" in e.name}


def fused_kernel_available() -> bool:
    q = torch.randn(1, 1, 16, 8)
    return FUSED in sdpa_ops(lambda: F.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("side, heads", SHAPES, ids=SHAPE_IDS)
def test_output_and_gradients_match_the_old_layout(side, heads, channels_last):
    block, x = make_block(side, heads)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    results = []
    for fn in (block, lambda t: old_layout(block, t)):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()  # a non-uniform upstream grad
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (new_out, new_dx, new_dw), (old_out, old_dx, old_dw) = results
    torch.testing.assert_close(new_out, old_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_dx, old_dx, atol=1e-5, rtol=1e-5)
    assert new_dw.keys() == old_dw.keys()
    for name in new_dw:
        torch.testing.assert_close(new_dw[name], old_dw[name], atol=1e-4, rtol=1e-4, msg=name)


def test_weights_and_state_dict_keys_are_unchanged():
    # Checkpoints written before the layout change load as they are.
    block = AttentionBlock(64, heads=4, groups=8)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == {
        "norm.weight": (64,), "norm.bias": (64,), "qkv.weight": (192, 64, 1, 1), "qkv.bias": (192,),
        "proj.weight": (64, 64, 1, 1), "proj.bias": (64,)}
    other = AttentionBlock(64, heads=4, groups=8)
    other.load_state_dict(block.state_dict())  # strict


@pytest.mark.skipif(not fused_kernel_available(), reason="this torch build has no fused CPU SDPA kernel")
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("side, heads", SHAPES, ids=SHAPE_IDS)
def test_the_fused_cpu_kernel_runs_forward_and_backward(side, heads, channels_last):
    block, x = make_block(side, heads)
    if channels_last:  # how the trainer runs it (train.channels_last): NCHW is evaluate, sample and eager bench
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ops = sdpa_ops(lambda: block(x).sum().backward())
    assert FUSED in ops and FUSED + "_backward" in ops, ops
    assert MATH not in ops, ops


@pytest.mark.skipif(not fused_kernel_available(), reason="this torch build has no fused CPU SDPA kernel")
def test_the_old_layout_takes_the_math_path():
    # Guards the test above: the profiler does tell the two paths apart for this block's shapes.
    block, x = make_block(16, 1)
    ops = sdpa_ops(lambda: old_layout(block, x.requires_grad_()).sum().backward())
    assert MATH in ops and FUSED not in ops, ops
