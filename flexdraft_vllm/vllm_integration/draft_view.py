"""The mask path in its own precision (FlexDraftConfig.draft_dtype).

A sequential draft pass reads the deep layers' weights for a handful of rows,
so it is bound by weight traffic and, on CPUs, by float32 matmul throughput.
Drafts are only proposals (vLLM verifies them against the target in the
target's own dtype), so they may be computed in a lower precision at no cost
to the output. On a 2-core AMX Xeon a [8 x 576] x [576 x 3072] matmul takes
371 us in float32 and 172 us in bfloat16; at 512 rows, 4.4 ms vs 0.7 ms.

`resolve_draft_dtype` turns the config value into a dtype. `DraftPrecisionView`
offers the interface the drafter's mask path reads (reference.drafter:
layers[l].input_layernorm, project_qkv, mlp_block, final_hidden, embed,
lm_head_weight) over low-precision copies of the deep layers' norms and MLP
weights. Real rows never see these copies: they run through vLLM's modules.

vLLM's CPU linear layers drop their `weight` after packing it for oneDNN
(dispatch_cpu_unquantized_gemm(remove_weight=True)); the weight is then read
back through the layer itself: layer(I) = I @ W^T = W^T, exact in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from flexdraft_vllm.config import FlexDraftConfig
from flexdraft_vllm.vllm_integration import cpu_gemm

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fast_bf16(device: torch.device) -> bool:
    """Hardware where bfloat16 matmuls beat float32 ones."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # private probes (torch >= 2.3); a torch without them: assume not
        probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(f()) for f in probes if f is not None)
    return False


def resolve_draft_dtype(config: FlexDraftConfig, target_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if config.draft_dtype != "auto":
        return _DTYPES[config.draft_dtype]
    # CUDA: the Triton mask-attention kernel reads the cache in its own dtype; a
    # float32 target on CUDA is a test setting, kept exact there.
    if target_dtype == torch.float32 and device.type == "cpu" and fast_bf16(device):
        return torch.bfloat16
    return target_dtype


@torch.no_grad()
def linear_weight(mod: nn.Module, in_features: int, dtype: torch.dtype) -> torch.Tensor:  # [out, in]
    """A vLLM linear layer's weight in `dtype`, also when vLLM kept only a packed copy."""
    assert getattr(mod, "bias", None) is None, "the deep MLPs of Llama/Qwen have no bias"
    w = getattr(mod, "weight", None)
    if w is not None and w.dim() == 2 and w.shape[1] == in_features:
        return w.detach().to(dtype).contiguous()
    ref = w if w is not None else next(mod.parameters())
    eye = torch.eye(in_features, dtype=ref.dtype, device=ref.device)
    out = mod(eye)
    out = out[0] if isinstance(out, tuple) else out  # vLLM linears return (output, bias)
    return out.t().to(dtype).contiguous()


class _Norm:
    """RMSNorm over a low-precision row: statistics in float32, output in dtype.
    fused: vLLM's CPU rms_norm op (one call instead of ~8 small ops; the same
    float32 statistics; the weight multiply rounds in dtype)."""

    def __init__(self, norm: nn.Module, dtype: torch.dtype, fused: bool = False):
        self.weight = norm.weight.detach().float()
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.dtype = dtype
        self.fused_weight = norm.weight.detach().to(dtype).contiguous() if fused else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_weight is not None:
            x = x.contiguous()
            out = torch.empty_like(x)
            torch.ops._C.rms_norm(out, x, self.fused_weight, self.eps)
            return out
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).to(self.dtype)


def _matmul(weight: torch.Tensor, packed: bool):  # x [..., in] -> x @ weight^T [..., out]
    return cpu_gemm.PackedLinear(weight) if packed else (lambda x: nn.functional.linear(x, weight))


class _DraftLayer:
    """One deep layer's shared (frozen) parts, copied to dtype."""

    def __init__(self, layer: nn.Module, hidden: int, intermediate: int, dtype: torch.dtype, packed: bool):
        self.input_layernorm = _Norm(layer.input_layernorm, dtype, fused=packed)
        self.post_attention_layernorm = _Norm(layer.post_attention_layernorm, dtype, fused=packed)
        gate_up = linear_weight(layer.mlp.gate_up_proj, hidden, dtype)  # [2I, h]: gate rows, then up rows
        down = linear_weight(layer.mlp.down_proj, intermediate, dtype)  # [h, I]
        assert gate_up.shape == (2 * intermediate, hidden) and down.shape == (hidden, intermediate)
        self.gate_up, self.down = _matmul(gate_up, packed), _matmul(down, packed)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class DraftPrecisionView:
    def __init__(self, view, deep_layers: range, dtype: torch.dtype, packed: bool = False):
        """packed (CPU, cpu_gemm.available): the MLP copies and, after fuse_qkv,
        the mask projectors' q/k/v (one fused weight each) through vLLM's
        prepacked GEMM, norms through its rms_norm op. Fewer, larger ops: at a handful of rows the mask
        path's time is mostly per-op overhead."""
        self.base = view
        self.dtype = dtype
        self.packed = packed
        cfg = view.cfg
        self.layers = {l: _DraftLayer(view.layers[l], cfg.hidden_size, cfg.intermediate_size, dtype, packed)
                       for l in deep_layers}
        self.norm = _Norm(view.norm, dtype, fused=packed)
        self._qkv: dict[nn.Module, tuple] = {}  # projector -> (fused q/k/v matmul, split sizes); fuse_qkv fills it
        self.lm_head_weight = view.lm_head_weight  # the drafter slices and casts its rows once

    @property
    def device(self) -> torch.device:
        return self.base.device

    def project_qkv(self, proj: nn.Module, x: torch.Tensor, positions: torch.Tensor):
        """q [n, Hq, D], k/v [n, Hkv, D] in dtype; RoPE in the cos/sin cache's dtype (float32)."""
        b, n = self.base, x.shape[0]
        fused = self._qkv.get(proj)
        if fused is not None:
            q, k, v = fused[0](x).split(fused[1], dim=-1)
        else:
            q, k, v = proj.q_proj(x), proj.k_proj(x), proj.v_proj(x)
        if proj.q_norm is not None:
            q = proj.q_norm(q.view(n, b.num_heads, b.head_dim)).reshape(n, -1)
            k = proj.k_norm(k.view(n, b.num_kv_heads, b.head_dim)).reshape(n, -1)
        q, k = b.apply_rope(positions, q.float(), k.float())
        return (q.view(n, b.num_heads, b.head_dim).to(self.dtype), k.view(n, b.num_kv_heads, b.head_dim).to(self.dtype),
                v.view(n, b.num_kv_heads, b.head_dim))

    def fuse_qkv(self, projectors) -> None:
        """With `packed`: each mask projector's q, k, v as one packed GEMM over
        their stacked weights. Called once the projectors are loaded (frozen)."""
        assert self.packed, "fused q/k/v runs through the packed CPU GEMM"
        for proj in projectors:
            mods = (proj.q_proj, proj.k_proj, proj.v_proj)
            bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods]).to(self.dtype)
            w = torch.cat([m.weight.detach().to(self.dtype) for m in mods])
            self._qkv[proj] = (cpu_gemm.PackedLinear(w, bias), [m.weight.shape[0] for m in mods])

    def mlp_block(self, layer: _DraftLayer, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed(ids).to(self.dtype)
