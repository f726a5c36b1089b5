"""The FlexDraft drafter: the only trained weights, living inside the target.

  mask_embedding          [h]   hidden state injected for every mask at the split layer
  mask_attn[l - s]        tuned q/k/v/o (+ q/k norms) for mask rows in deep layer l
  calibrator              bonus-guided MLP on the final-normed mask hidden (anchors below)
  draft_vocab             [K] token ids drafts are drawn from (only when
                          config.draft_vocab_size = K > 0; else the full vocabulary)
  bonus_proj              Linear(h, 2h): the bonus's embedding -> start states of
                          slot 0 and slots 1.. (only when config.bonus_in_block;
                          sequential passes, see initial_mask_hidden)

Layernorms and MLPs are the target's (shared, frozen). Real rows never touch
anything here, which is what makes FlexDraft lossless.

Calibrator ("tied", our default; the paper's head is "full"):
  c      = Linear(2h, r) -> SiLU -> Linear(r, h)   on cat(embed(bonus), normed)
  logits = lm_head(normed + c)                     (= lm_head(normed) + lm_head(c))
"full":  logits = lm_head(normed) + Linear(r, V)(...). The last layer is zero-
initialised either way, so an untrained calibrator is the identity.

Anchor (config.calib_anchor; `block_logits`): "bonus", the paper's, calibrates
every slot with the resolved bonus. "chain" (ours) calibrates slot 1 with the
bonus and slot k with the draft chosen for slot k-1: the mask hidden of slot k
only knows the context before the bonus, and the previous token is the piece
of information it misses most. A slot's draft only matters when all earlier
drafts were accepted, and then its anchor is the true previous token (how it is
trained). The price is K small sequential head calls instead of one batched.

With a draft vocabulary, lm_head above is its K-row slice (cached once) and
draft logits index the draft vocabulary; `token_ids` maps them back. Drafts
are proposals only, so this changes speed and acceptance, never the output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexdraft_vllm.config import CONFIG_KEY, FlexDraftConfig, FlexDraftConfigError
from flexdraft_vllm.reference.attention import block_attention
from flexdraft_vllm.reference.confidence import VerifyCut, draft_confidence

WEIGHTS_FILE = "model.safetensors"


class MaskProjector(nn.Module):
    """Tuned attention projectors for mask rows of one deep layer.

    Same attribute names as an HF self_attn (q_proj, k_proj, v_proj, o_proj,
    optional q_norm/k_norm) so one projection routine serves real and mask rows.
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None

    @classmethod
    def copy_of(cls, target_attn: nn.Module) -> "MaskProjector":
        """Initialise from a (frozen) HF attention module: drafting starts from the target."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            mod = getattr(target_attn, name, None)
            setattr(m, name, copy.deepcopy(mod) if mod is not None else None)
        for p in m.parameters():
            p.requires_grad_(True)
        return m


def dense_block_attend(
    k_ctx: torch.Tensor,  # [T, Hkv, D] real keys of one request in one layer
    v_ctx: torch.Tensor,  # [T, Hkv, D]
    ctx_lens: torch.Tensor,  # [G]
    scale: float,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """An `attend` callback over contiguous real K/V (reference path)."""
    return lambda q, k, v: block_attention(q, k, v, k_ctx, v_ctx, ctx_lens, scale)


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
        head: Callable[[torch.Tensor], torch.Tensor],  # x [..., h] -> x @ lm_head^T [..., V]
    ) -> torch.Tensor:  # [..., V]
        c = self.fc2(torch.nn.functional.silu(self.fc1(torch.cat([bonus_emb, normed], dim=-1))))
        if self.kind == "tied":
            return head(normed + c)
        return head(normed) + c


class FlexDraftDrafter(nn.Module):
    def __init__(self, config: FlexDraftConfig, target):
        """`target`: a TargetAdapter (HF, reference/training) or the vLLM view;
        it provides make_mask_projector, dtype and device."""
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.mask_embedding = nn.Parameter(torch.zeros(h, dtype=target.dtype, device=target.device))
        self.mask_attn = nn.ModuleList(target.make_mask_projector(l) for l in config.deep_layers)
        K = config.draft_vocab_size
        self.calibrator = Calibrator(h, config.calib_rank, K or config.vocab_size, config.calibrator).to(
            device=target.device, dtype=target.dtype
        )
        # [K] ascending token ids; set by training (set_draft_vocab) or loaded with the weights
        self.register_buffer("draft_vocab", torch.arange(K, device=target.device) if K else None)
        self.bonus_proj = None
        if config.bonus_in_block:
            self.bonus_proj = nn.Linear(h, 2 * h, bias=False).to(device=target.device, dtype=target.dtype)
            nn.init.zeros_(self.bonus_proj.weight)  # untrained: the plain block
        self._head: tuple | None = None  # (lm_head it was sliced from, (vocab version, dtype), [K, h] rows)
        # x -> x @ head_weight^T computed another way (vLLM's packed CPU GEMM); set by the
        # vLLM proposer after loading, when the draft vocabulary no longer changes
        self.head_matmul: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ---- the mask path ---------------------------------------------------------
    def mask_layer(
        self,
        target,
        layer_idx: int,
        h: torch.Tensor,  # [G, B, hidden] mask hidden entering deep layer `layer_idx`
        positions: torch.Tensor,  # [G, B] absolute positions (ctx_g .. ctx_g+B-1)
        attend: Callable,  # (q [G,B,Hq,D], k, v [G,B,Hkv,D]) -> [G,B,Hq,D]: block attention
    ) -> torch.Tensor:  # [G, B, hidden]
        """One deep layer for mask rows: shared norms and MLP, tuned projectors.

        `attend` supplies the real-token K/V of this layer (dense reference,
        paged-cache gather, or the Triton kernel); masks never write them.
        """
        G, B, hid = h.shape
        layer = target.layers[layer_idx]
        proj = self.mask_attn[layer_idx - self.config.split_layer]
        x = layer.input_layernorm(h.reshape(G * B, hid))
        q, k, v = target.project_qkv(proj, x, positions.reshape(-1))
        shp = lambda t: t.view(G, B, t.shape[1], t.shape[2])  # noqa: E731
        a = attend(shp(q), shp(k), shp(v))
        h = h + proj.o_proj(a.reshape(G, B, -1))
        return target.mlp_block(layer, h)

    def initial_mask_hidden(
        self,
        G: int,
        B: int,
        bonus_emb: torch.Tensor | None = None,  # [G, h] embedding of each block's bonus (sequential pass)
    ) -> torch.Tensor:  # [G, B, h] hidden entering the split layer
        """mask_embedding everywhere; with a known bonus and config.bonus_in_block,
        plus W0 e(bonus) at slot 0 (the bonus's own slot) and W1 e(bonus) at the
        draft slots. A zero row of bonus_emb gives the plain block (Linear, no bias).

        e(bonus) is rescaled to the RMS of mask_embedding first: token embeddings
        are ~100x smaller than hidden states at a deep split layer (SmolLM2: RMS
        0.11 vs 10), and a zero-initialised W would need ~100x the learning
        rate of the rest to matter (measured: no held-out gain in 150 steps)."""
        h = self.mask_embedding.expand(G, B, -1)
        if bonus_emb is None or self.bonus_proj is None:
            return h
        e = bonus_emb.to(h.dtype)
        e = e * (self.mask_embedding.detach().float().pow(2).mean().sqrt()
                 / e.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)).to(h.dtype)
        w0, w1 = self.bonus_proj(e).chunk(2, dim=-1)  # [G, h] each
        return torch.cat([(h[:, 0] + w0)[:, None], h[:, 1:] + w1[:, None]], 1)

    def draft_hidden(
        self,
        target,
        ctx_lens: torch.Tensor,  # [G] context length (= bonus position) of each block
        attend_for_layer: Callable[[int], Callable],  # layer index -> attend callback
        block: int | None = None,  # B masks per block (default config.block_size; fewer: a trimmed block)
        bonus_emb: torch.Tensor | None = None,  # [G, h] embedding of each block's bonus, when known
    ) -> torch.Tensor:  # [G, B, hidden] final-normed
        """Run G mask blocks through the deep layers only (sequential draft pass).

        A trimmed block (B < block_size) holds the bonus slot and B-1 drafts:
        for a step that verifies fewer drafts than the block has, the masks
        after them cost rows and change little. `bonus_emb` (target.embed of
        the bonuses) is used by a bonus_in_block drafter and ignored otherwise."""
        B = block or self.config.block_size
        assert 2 <= B <= self.config.block_size, (B, self.config.block_size)
        G = ctx_lens.shape[0]
        assert bonus_emb is None or bonus_emb.shape[0] == G, (bonus_emb.shape, G)
        positions = ctx_lens[:, None] + torch.arange(B, device=ctx_lens.device)[None, :]
        h = self.initial_mask_hidden(G, B, bonus_emb)
        for l in self.config.deep_layers:
            h = self.mask_layer(target, l, h, positions, attend_for_layer(l))
        return target.final_hidden(h)

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """token_ids: [K] distinct ids (stored sorted)."""
        assert self.draft_vocab is not None and token_ids.numel() == self.draft_vocab.numel(), \
            "draft vocabulary size is fixed by config.draft_vocab_size"
        assert token_ids.unique().numel() == token_ids.numel(), "draft vocabulary ids must be distinct"
        self.draft_vocab.copy_(token_ids.sort().values)

    def head_weight(self, target) -> torch.Tensor:  # [K or V, h]
        """The LM-head rows drafts are scored on, in the drafter's dtype (frozen;
        a slice or cast copy is cached)."""
        w = target.lm_head_weight
        dtype = self.mask_embedding.dtype
        if self.draft_vocab is None and w.dtype == dtype:
            return w
        version = None if self.draft_vocab is None else self.draft_vocab._version  # bumped by set_draft_vocab / load
        if self._head is None or self._head[0] is not w or self._head[1] != (version, dtype):
            rows = w.detach() if self.draft_vocab is None else w.detach().index_select(0, self.draft_vocab.to(w.device))
            self._head = (w, (version, dtype), rows.to(dtype))
        return self._head[2]

    def draft_logits(
        self,
        target,
        normed: torch.Tensor,  # [..., hidden] final-normed hidden of draft masks
        bonus_ids: torch.Tensor,  # [...] the resolved bonus each mask is anchored on
    ) -> torch.Tensor:  # [..., K or V] over the draft vocabulary (see token_ids)
        head = self.head_matmul
        if head is None:
            w = self.head_weight(target)
            head = lambda x: x @ w.t()  # noqa: E731
        return self.calibrator(normed, target.embed(bonus_ids), head)

    def block_logits(
        self,
        target,
        normed: torch.Tensor,  # [N, K, hidden] final-normed hidden of draft slots 1..K of N blocks
        bonus_ids: torch.Tensor,  # [N] the resolved bonus of each block
        pick: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        cut: VerifyCut | None = None,
    ) -> torch.Tensor:  # [N, K' <= K, K_vocab] calibrated logits over the draft vocabulary
        """Calibrated logits of a block's draft slots, anchored per config.calib_anchor.

        "bonus": every slot on the bonus, one batched call. "chain": slot k is
        anchored on the draft chosen for slot k-1 (slot 1 on the bonus), so the
        slots run one after another; `pick(logits [N, K_vocab], k) -> [N]`
        chooses that draft (default argmax; a sampler passes its own draw and
        must then propose exactly the picks it made). With `cut` the chain
        stops at the slot after which verification would keep no more drafts
        (each slot costs a read of the draft head: most of a CPU's chain time).
        """
        if self.config.calib_anchor == "bonus":
            return self.draft_logits(target, normed, bonus_ids[:, None].expand(normed.shape[:2]))
        pick = pick or (lambda lg, k: lg.argmax(-1))
        anchor, out = bonus_ids, []
        for k in range(normed.shape[1]):
            out.append(self.draft_logits(target, normed[:, k], anchor))
            if cut is not None and cut.push(draft_confidence(out[-1])):
                break
            anchor = self.token_ids(pick(out[-1], k))
        return torch.stack(out, 1)

    def token_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Indices into draft_logits' last dimension -> target token ids."""
        return draft_ids if self.draft_vocab is None else self.draft_vocab[draft_ids]

    # ---- checkpoint ----------------------------------------------------------------
    @staticmethod
    def cast_weights(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Floating-point tensors to `dtype`; integer ones (the draft vocabulary's
        token ids) keep theirs: a half-precision id above 2048 would be corrupt."""
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.cast_weights(self.state_dict(), dtype).items()}
        save_file(sd, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = {"architectures": ["FlexDraftDrafter"], CONFIG_KEY: self.config.weights_dict()}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(
        cls,
        path: str | Path,
        target,
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
        own = drafter.state_dict()
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
                  if k in own and v.shape != own[k].shape]
        if shapes:
            raise FlexDraftConfigError(
                f"drafter checkpoint {path} does not match its config (weight shapes {shapes[:4]}): "
                f"config.json and {WEIGHTS_FILE} come from different checkpoints; retrain it"
            )
        missing, unexpected = drafter.load_state_dict(
            cls.cast_weights(sd, target.dtype), strict=False
        )
        if missing or unexpected:
            raise FlexDraftConfigError(
                f"drafter checkpoint {path} does not match its config "
                f"(missing {missing[:4]}..., unexpected {unexpected[:4]}...): the file is corrupt or from "
                f"another flexdraft-vllm version; retrain it"
            )
        return drafter.to(target.device).eval()
