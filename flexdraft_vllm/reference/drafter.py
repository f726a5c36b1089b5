"""The FlexDraft drafter: the only trained weights, living inside the target.

  mask_embedding          [h]   hidden state injected for every mask at the split layer
  mask_attn[l - s]        tuned q/k/v/o (+ q/k norms) for mask rows in deep layer l
  calibrator              bonus-guided MLP on the final-normed mask hidden

Layernorms and MLPs are the target's (shared, frozen). Real rows never touch
anything here, which is what makes FlexDraft lossless.

Calibrator ("tied", our default; the paper's head is "full"):
  c      = Linear(2h, r) -> SiLU -> Linear(r, h)   on cat(embed(bonus), normed)
  logits = lm_head(normed + c)                     (= lm_head(normed) + lm_head(c))
"full":  logits = lm_head(normed) + Linear(r, V)(...). The last layer is zero-
initialised either way, so an untrained calibrator is the identity.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexdraft_vllm.config import CONFIG_KEY, FlexDraftConfig, FlexDraftConfigError
from flexdraft_vllm.reference.attention import block_attention
from flexdraft_vllm.reference.target import TargetAdapter

WEIGHTS_FILE = "model.safetensors"


class MaskProjector(nn.Module):
    """Tuned attention projectors for mask rows of one deep layer.

    Same attribute names as the target's self_attn so TargetAdapter.project_qkv
    serves both; initialised as a copy of the frozen projectors.
    """

    def __init__(self, target_attn: nn.Module):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            mod = getattr(target_attn, name, None)
            setattr(self, name, copy.deepcopy(mod) if mod is not None else None)
        for p in self.parameters():
            p.requires_grad_(True)


class Calibrator(nn.Module):
    def __init__(self, hidden: int, rank: int, vocab: int, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(2 * hidden, rank)
        self.fc2 = nn.Linear(rank, hidden if kind == "tied" else vocab)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(
        self,
        normed: torch.Tensor,  # [..., h] final-normed mask hidden
        bonus_emb: torch.Tensor,  # [..., h] target embedding of the resolved bonus token
        lm_head: torch.Tensor,  # [V, h]
    ) -> torch.Tensor:  # [..., V]
        c = self.fc2(torch.nn.functional.silu(self.fc1(torch.cat([bonus_emb, normed], dim=-1))))
        if self.kind == "tied":
            return (normed + c) @ lm_head.t()
        return normed @ lm_head.t() + c


class FlexDraftDrafter(nn.Module):
    def __init__(self, config: FlexDraftConfig, target: TargetAdapter):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.mask_embedding = nn.Parameter(torch.zeros(h, dtype=target.dtype, device=target.device))
        self.mask_attn = nn.ModuleList(MaskProjector(target.layers[l].self_attn) for l in config.deep_layers)
        self.calibrator = Calibrator(h, config.calib_rank, config.vocab_size, config.calibrator).to(
            device=target.device, dtype=target.dtype
        )

    # ---- the mask path ---------------------------------------------------------
    def mask_layer(
        self,
        target: TargetAdapter,
        layer_idx: int,
        h: torch.Tensor,  # [G, B, hidden] mask hidden entering deep layer `layer_idx`
        positions: torch.Tensor,  # [G, B] absolute positions (ctx_g .. ctx_g+B-1)
        k_ctx: torch.Tensor,  # [T, Hkv, D] real keys of this request in this layer (RoPE'd)
        v_ctx: torch.Tensor,  # [T, Hkv, D]
        ctx_lens: torch.Tensor,  # [G]
    ) -> torch.Tensor:  # [G, B, hidden]
        G, B, hid = h.shape
        layer = target.layers[layer_idx]
        proj = self.mask_attn[layer_idx - self.config.split_layer]
        x = layer.input_layernorm(h.reshape(G * B, hid))
        cos, sin = target.rope(positions.reshape(-1), x)
        q, k, v = target.project_qkv(proj, x, cos, sin)
        shp = lambda t: t.view(G, B, t.shape[1], t.shape[2])  # noqa: E731
        a = block_attention(shp(q), shp(k), shp(v), k_ctx, v_ctx, ctx_lens, target.scale)
        h = h + proj.o_proj(a.reshape(G, B, -1))
        return target.mlp_block(layer, h)

    def initial_mask_hidden(self, G: int, B: int) -> torch.Tensor:
        return self.mask_embedding.expand(G, B, -1)

    def draft_hidden(
        self,
        target: TargetAdapter,
        ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],  # per deep layer: (k, v) [T, Hkv, D]
        ctx_lens: torch.Tensor,  # [G] context length (= bonus position) of each block
    ) -> torch.Tensor:  # [G, B, hidden] final-normed
        """Run G mask blocks through the deep layers over given real K/V."""
        B = self.config.block_size
        G = ctx_lens.shape[0]
        positions = ctx_lens[:, None] + torch.arange(B, device=ctx_lens.device)[None, :]
        h = self.initial_mask_hidden(G, B)
        for i, l in enumerate(self.config.deep_layers):
            k, v = ctx_kv[i]
            h = self.mask_layer(target, l, h, positions, k, v, ctx_lens)
        return target.final_hidden(h)

    def draft_logits(
        self,
        target: TargetAdapter,
        normed: torch.Tensor,  # [..., hidden] final-normed hidden of draft masks
        bonus_ids: torch.Tensor,  # [...] the resolved bonus each mask is anchored on
    ) -> torch.Tensor:  # [..., V]
        return self.calibrator(normed, target.embed(bonus_ids), target.lm_head_weight)

    # ---- checkpoint ----------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = {"architectures": ["FlexDraftDrafter"], CONFIG_KEY: self.config.weights_dict()}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(
        cls,
        path: str | Path,
        target: TargetAdapter,
        runtime: dict | None = None,
        target_fingerprint: str | None = None,
    ) -> "FlexDraftDrafter":
        """Load a checkpoint and check it against `target` (clear error on mismatch)."""
        cfg = FlexDraftConfig.from_checkpoint(path, runtime)
        cfg.check_target(target.cfg, target_fingerprint)
        drafter = cls(cfg, target)
        wfile = Path(path) / WEIGHTS_FILE
        if not wfile.is_file():
            raise FlexDraftConfigError(f"drafter checkpoint {path} has config.json but no {WEIGHTS_FILE}")
        sd = load_file(str(wfile))
        missing, unexpected = drafter.load_state_dict(
            {k: v.to(target.dtype) for k, v in sd.items()}, strict=False
        )
        if missing or unexpected:
            raise FlexDraftConfigError(
                f"drafter checkpoint {path} does not match its config "
                f"(missing {missing[:4]}..., unexpected {unexpected[:4]}...): the file is corrupt or from "
                f"another flexdraft-vllm version; retrain it"
            )
        return drafter.to(target.device).eval()
