"""The draft pass's matmuls through vLLM's prepacked oneDNN CPU GEMM.

A sequential draft pass multiplies a handful of rows (B per request) by the
deep layers' weights and the draft head. vLLM runs the target's own linears
through `onednn_mm` with weights reordered ("prepacked") once at load; plain
`torch.nn.functional.linear` reorders on every call, which at decode-sized M
is most of its time. On a 2-core AMX Xeon, bf16, M = 8 rows:

  weight [out x in]   F.linear   onednn_mm (prepacked)
  3072 x 576            127 us      53 us
   576 x 1536            56 us      20 us
   576 x 576             37 us      13 us
  16384 x 576           734 us     489 us   (the draft head)

So on CPU the mask path's linears (tuned projectors, calibrator, shared MLP
copies, draft head) are packed once when the proposer loads. The result is the
same product in the same dtype (oneDNN accumulates in float32 either way);
drafts are proposals only, so any rounding difference changes speed, never the
output. Off CPU, or on a vLLM build without oneDNN, nothing is packed.
"""

from __future__ import annotations

import torch
from torch import nn


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """vLLM's oneDNN GEMM can serve `dtype` matmuls on `device`."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return False
    return bool(getattr(ops, "_supports_onednn", False))


class PackedLinear(nn.Module):
    """y = x @ W^T (+ b), W packed once for oneDNN. Frozen, inference only: the
    packed copy is taken here, so a later change to .weight (load_state_dict)
    is not seen; pack after loading."""

    def __init__(
        self,
        weight: torch.Tensor,  # [out, in]
        bias: torch.Tensor | None = None,  # [out]
    ):
        super().__init__()
        from vllm import _custom_ops as ops

        assert weight.dim() == 2 and weight.device.type == "cpu", "a 2-D CPU weight"
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)  # kept for state_dict
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous(), requires_grad=False)
        self._ops = ops
        self._handler = ops.create_onednn_mm(self.weight.t(), 32)  # its own packed copy of W

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        x = x.to(self.weight.dtype)
        if not x.is_contiguous():
            x = x.contiguous()
        return self._ops.onednn_mm(self._handler, x, self.bias)


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by a PackedLinear of the same
    weights, in place; returns how many were replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child.weight, child.bias))
            n += 1
        else:
            n += pack_linears(child)
    return n
