"""Reference decoding loops: plain target decoding and FlexDraft (parallel /
sequential), batch > 1 with ragged lengths, greedy or random sampling.

Per step and request (FlexDraft):
  candidates = [bonus, d_1 .. d_n]           bonus = last resolved token, not yet cached
  verify     -> a accepted drafts + one new token t (recovered or bonus)
  commit     -> candidates[0 .. a] enter the cache; t becomes the next bonus
  draft      -> parallel: block min(a, G-1) of this same forward, calibrated with t;
                sequential: one deep-layers-only block over the cache, calibrated with t
  n_next     -> verify_length(confidence of the calibrated drafts)
This is the behaviour the vLLM integration must reproduce; tests check that
greedy output equals plain decoding and that sampling keeps the target law.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexdraft_vllm.reference.confidence import VerifyCut, draft_confidence, verify_length
from flexdraft_vllm.reference.drafter import FlexDraftDrafter
from flexdraft_vllm.reference.forward import RequestCache, draft_pass, step_forward
from flexdraft_vllm.reference.sampling import PLACEHOLDER, rejection_sample, target_probs
from flexdraft_vllm.reference.target import TargetAdapter


@dataclass
class DecodeStats:
    steps: int = 0  # target forwards (verify steps, prefill excluded)
    emitted: int = 0  # tokens emitted by those steps
    accepted_per_pos: list[int] = field(default_factory=list)  # drafts accepted at position i
    proposed_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per target forward, bonus included (>= 1)."""
        return self.emitted / max(self.steps, 1)

    def record(self, n_drafts: int, n_out: int) -> None:
        self.steps += 1
        self.emitted += n_out
        for i in range(n_drafts):
            while len(self.proposed_per_pos) <= i:
                self.proposed_per_pos.append(0)
                self.accepted_per_pos.append(0)
            self.proposed_per_pos[i] += 1
            self.accepted_per_pos[i] += int(i < n_out - 1)


@dataclass
class _Req:
    prompt: list[int]
    cache: RequestCache = field(default_factory=RequestCache)
    out: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None  # [n, V] draft distribution (random sampling)
    done: bool = False
    gen: torch.Generator | None = None


def _finish(r: _Req, new: list[int], max_new: int, eos: int | None) -> None:
    for t in new:
        if r.done:
            return
        r.out.append(t)
        if (eos is not None and t == eos) or len(r.out) >= max_new:
            r.done = True


def _noise(r: _Req, shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.empty(shape).exponential_(generator=r.gen).to(device)


def _uniform(r: _Req, shape: tuple[int, ...], device) -> torch.Tensor:
    return torch.rand(shape, generator=r.gen).to(device)


def _sample_first(r: _Req, logits: torch.Tensor, temperature: float) -> int:
    """Token after the prompt / a plain step: argmax, or a draw from softmax(logits/T)."""
    if temperature <= 0:
        return int(logits.argmax())
    p = target_probs(logits[None, None], torch.tensor([temperature]))[0, 0]
    return int((p / _noise(r, p.shape, p.device)).argmax())


def _make_reqs(prompts: list[list[int]], seed: int, temperature: float) -> list[_Req]:
    reqs = [_Req(prompt=list(p)) for p in prompts]
    if temperature > 0:
        for i, r in enumerate(reqs):
            r.gen = torch.Generator().manual_seed(seed * 100003 + i)
    return reqs


@torch.no_grad()
def generate_plain(
    target: TargetAdapter,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_id: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """One token per request per forward: the baseline FlexDraft must equal."""
    reqs = _make_reqs(prompts, seed, temperature)
    out = step_forward(target, None, [r.cache for r in reqs], [torch.tensor(r.prompt) for r in reqs])
    for r, lg, k, v in zip(reqs, out.logits, out.new_k, out.new_v):
        r.cache.commit(k, v, len(r.prompt))
        _finish(r, [_sample_first(r, lg[-1], temperature)], max_new_tokens, eos_id)
    while True:
        act = [r for r in reqs if not r.done]
        if not act:
            return [r.out for r in reqs]
        out = step_forward(target, None, [r.cache for r in act], [torch.tensor(r.out[-1:]) for r in act])
        for r, lg, k, v in zip(act, out.logits, out.new_k, out.new_v):
            r.cache.commit(k, v, 1)
            _finish(r, [_sample_first(r, lg[-1], temperature)], max_new_tokens, eos_id)


def _propose(
    target: TargetAdapter,
    drafter: FlexDraftDrafter,
    r: _Req,
    block: torch.Tensor,  # [B, h] final-normed hidden of the block whose slot 0 is the bonus
    offset: int,  # how many slots past slot 0 the bonus really is (parallel: a - g)
    temperature: float,
) -> None:
    cfg = drafter.config
    rows = block[1 + offset:]  # slots after the bonus predict the following tokens
    rows = rows[: cfg.num_drafts]
    if rows.shape[0] == 0:
        r.drafts, r.q = [], None
        return
    bonus = torch.tensor([r.out[-1]], device=rows.device)
    cut = VerifyCut(cfg.verify_rule, cfg.tau, cfg.min_confidence, cfg.max_verify)  # chain: skip slots never verified
    if temperature <= 0:
        logits = drafter.block_logits(target, rows[None], bonus, cut=cut)[0].float()  # [k, K]: over the draft vocabulary
        picks = logits.argmax(-1)
    else:
        # drafts are drawn slot by slot from their own calibrated q_i (exponential-race
        # sampling); with calib_anchor="chain" each draw anchors the next slot
        noise = _noise(r, (rows.shape[0], cfg.vocab_size), rows.device)
        if drafter.draft_vocab is not None:
            noise = noise[:, drafter.draft_vocab]
        draw = lambda lg, k: (torch.softmax(lg.float() / temperature, -1) / noise[k]).argmax(-1)  # noqa: E731
        logits = drafter.block_logits(target, rows[None], bonus, pick=draw, cut=cut)[0].float()
        picks = torch.stack([draw(lg, k) for k, lg in enumerate(logits)])
    conf = draft_confidence(logits)
    n = int(verify_length(conf[None], cfg.verify_rule, cfg.tau, cfg.min_confidence, cfg.max_verify)[0])
    r.drafts = drafter.token_ids(picks[:n]).tolist()
    if temperature <= 0:
        r.q = None
    else:
        q_draft = torch.softmax(logits[:n] / temperature, -1)
        # the draft law over the full vocabulary: zero outside the draft vocabulary
        r.q = q_draft if drafter.draft_vocab is None else torch.zeros(
            n, cfg.vocab_size, device=q_draft.device).index_copy_(1, drafter.draft_vocab, q_draft)


@torch.no_grad()
def generate_flexdraft(
    target: TargetAdapter,
    drafter: FlexDraftDrafter,
    prompts: list[list[int]],
    max_new_tokens: int,
    mode: str = "parallel",
    temperature: float = 0.0,
    eos_id: int | None = None,
    seed: int = 0,
) -> tuple[list[list[int]], DecodeStats]:
    assert mode in ("parallel", "sequential"), mode
    cfg = drafter.config
    stats = DecodeStats()
    reqs = _make_reqs(prompts, seed, temperature)
    dev = target.device

    # ---- prefill: prompt as candidates; in parallel mode one block after it ----
    par = mode == "parallel"
    masks = cfg.block_for(cfg.num_drafts)  # per block, as vLLM runs them: trimmed to the verify cap + 1 masks
    out = step_forward(target, drafter, [r.cache for r in reqs], [torch.tensor(r.prompt) for r in reqs],
                       anchors=[[len(r.prompt) - 1] for r in reqs] if par else None, block=masks)
    for r, lg, k, v in zip(reqs, out.logits, out.new_k, out.new_v):
        r.cache.commit(k, v, len(r.prompt))
        _finish(r, [_sample_first(r, lg[-1], temperature)], max_new_tokens, eos_id)
    blocks = out.mask_hidden if par else [h[0] for h in draft_pass(target, drafter, [r.cache for r in reqs], masks,
                                                                  [r.out[-1] for r in reqs])]
    for r, blk in zip(reqs, blocks):
        if not r.done:
            _propose(target, drafter, r, blk[0] if par else blk, 0, temperature)

    while True:
        act = [r for r in reqs if not r.done]
        if not act:
            return [r.out for r in reqs], stats
        cands = [torch.tensor([r.out[-1]] + r.drafts) for r in act]
        groups = [min(len(r.drafts) + 1, cfg.max_parallel_groups or 10**9) for r in act]
        out = step_forward(target, drafter, [r.cache for r in act], cands,
                           anchors=[list(range(g)) for g in groups] if par else None, block=masks)
        K = max(len(r.drafts) for r in act)
        V = out.logits[0].shape[-1]
        tl = torch.zeros(len(act), K + 1, V, device=dev)
        ids = torch.full((len(act), K), PLACEHOLDER, dtype=torch.long, device=dev)
        qs = torch.zeros(len(act), K, V, device=dev) if temperature > 0 else None
        uni = torch.zeros(len(act), K, device=dev)
        noise = torch.ones(len(act), K + 1, V, device=dev)
        for i, (r, lg) in enumerate(zip(act, out.logits)):
            n = len(r.drafts)
            tl[i, : n + 1] = lg
            ids[i, :n] = torch.tensor(r.drafts, dtype=torch.long)
            if temperature > 0:
                qs[i, :n] = r.q
                uni[i] = _uniform(r, (K,), dev)
                noise[i] = _noise(r, (K + 1, V), dev)
        temp = torch.full((len(act),), float(temperature), device=dev)
        toks, n_out = rejection_sample(tl, ids, torch.tensor([len(r.drafts) for r in act]), qs, temp, uni, noise)

        accepted = []
        for i, r in enumerate(act):
            m = int(n_out[i])  # accepted drafts + 1
            stats.record(len(r.drafts), m)
            r.cache.commit(out.new_k[i], out.new_v[i], m)  # bonus + accepted drafts
            _finish(r, toks[i, :m].tolist(), max_new_tokens, eos_id)
            accepted.append(m - 1)
        if par:
            for i, r in enumerate(act):
                if r.done:
                    continue
                a = accepted[i]
                g = min(a, groups[i] - 1)
                _propose(target, drafter, r, out.mask_hidden[i][g], a - g, temperature)
        else:
            live = [r for r in act if not r.done]
            for r, h in zip(live, draft_pass(target, drafter, [r.cache for r in live], masks, [r.out[-1] for r in live])):
                _propose(target, drafter, r, h[0], 0, temperature)
