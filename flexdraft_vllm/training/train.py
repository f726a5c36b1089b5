"""Train a FlexDraft drafter for a target (attention tuning + calibration).

  python -m flexdraft_vllm.training.train --config flexdraft_vllm/configs/smollm2_135m.json

Stages (each resumable; state in <work_dir>/train_state.pt):
  data     self-distillation sequences + frozen deep-layer K/V (training/data.py)
  tune     mask_embedding + deep-layer mask projectors; loss = CE of each draft
           mask (slots 1..B-1 of a block anchored at a random response position
           p) against the target's own token at that position, uncalibrated
           (or, with joint=true, calibrated: the calibration MLP trains with
           them, anchored on the true bonus, which is what decoding scores).
  calib    calibration MLP only, anchored on the true bonus token x_p
           (calib_anchor="chain": slot k on the true token of slot k-1,
           see calib_anchors).
Only the drafter is trained; the target is frozen throughout.

A step draws seqs_per_step sequences x blocks_per_seq blocks and runs them as
one padded batch (batched_block_attention), so the cost is a few large matmuls
rather than a Python loop per sequence. precision="bf16" autocasts those
matmuls (AMX on recent Xeons, tensor cores on CUDA: ~7x the fp32 rate here);
weights, optimiser state and the softmax stay fp32.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flexdraft_vllm.config import FlexDraftConfig
from flexdraft_vllm.prepare import default_model_dir, weights_fingerprint
from flexdraft_vllm.reference.attention import batched_block_attention
from flexdraft_vllm.reference.drafter import FlexDraftDrafter
from flexdraft_vllm.reference.target import TargetAdapter, load_target
from flexdraft_vllm.training.data import build_dataset, build_kv_shards


@dataclass
class TrainConfig:
    target: str = ""  # prepared target folder ("" = the project's SmolLM2)
    out: str = "flexdraft_vllm/drafters/smollm2-135m"
    work_dir: str = ".cache/train/smollm2-135m"
    prompts_jsonl: str | None = None
    extra_prompts_jsonl: str | list[str] | None = None  # prompts added after the num_prompts base ones (data.py)
    extra_prompts: int | list[int] = 0  # how many of them (the first N of each file; 0 = all)
    num_prompts: int = 600
    max_new_tokens: int = 256
    split_layer: int = 20
    block_size: int = 8
    calibrator: str = "tied"
    calib_rank: int = 256
    calib_anchor: str = "bonus"  # "bonus" | "chain" (FlexDraftConfig.calib_anchor)
    draft_vocab_size: int = 0  # drafts from the K most frequent response tokens (0 = full vocabulary)
    bonus_in_block: bool = False  # blocks start from the bonus's embedding (FlexDraftConfig.bonus_in_block)
    # share of training blocks run without the bonus, as a parallel pass runs them
    # (bonus_in_block only): one checkpoint then serves both passes
    bonus_drop: float = 0.25
    seed: int = 0
    tune_steps: int = 600
    calib_steps: int = 200
    seqs_per_step: int = 4
    blocks_per_seq: int = 8
    lr_tune: float = 2e-4
    lr_calib: float = 1e-3
    # Loss weight of draft slot k (1-based) is exp(-(k-1)/pos_decay): drafts are
    # accepted as a prefix, so slot 1 matters most and the noisy far slots should
    # not dominate the gradient. 0 = uniform weights.
    pos_decay: float = 0.0
    joint: bool = False  # tune stage also trains the calibrator, on calibrated logits
    precision: str = "fp32"  # "fp32" | "bf16" (autocast for the matmuls; see the module docstring)
    save_every: int = 50
    holdout_seqs: int = 0  # the last N sequences are never trained on; their slot-1 accuracy is logged at saves
    threads: int = 0  # 0 = torch default
    init_from: str | None = None  # continue from a trained drafter (a second round on the same data)
    state_file: str = "train_state.pt"  # per round, so a finished round's state is kept

    @classmethod
    def load(cls, path: str | None, overrides: dict) -> "TrainConfig":
        d = json.loads(Path(path).read_text()) if path else {}
        d.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in fields(cls)}
        bad = set(d) - names
        if bad:
            raise SystemExit(f"unknown training option(s) {sorted(bad)}; allowed: {sorted(names)}")
        if not 0.0 <= d.get("bonus_drop", 0.25) <= 1.0:
            raise SystemExit(f"bonus_drop must be in [0, 1], got {d['bonus_drop']!r}")
        if d.get("precision", "fp32") not in ("fp32", "bf16"):
            raise SystemExit(f"precision must be 'fp32' or 'bf16', got {d['precision']!r}")
        return cls(**d)


def _load_shards(paths: list[Path]) -> list[dict]:
    items = []
    for p in paths:
        items += torch.load(p, weights_only=False)
    return [it for it in items if it["ids"].numel() - it["prompt_len"] >= 3]


def block_batch(items: list[dict], rng: random.Random, cfg: TrainConfig):
    """Sample sequences and anchors. Anchor p = bonus slot, in the response."""
    B = cfg.block_size
    out = []
    for it in rng.sample(items, min(cfg.seqs_per_step, len(items))):
        T, P = it["ids"].numel(), it["prompt_len"]
        anchors = sorted(rng.randrange(P, T - 1) for _ in range(cfg.blocks_per_seq))
        ctx = torch.tensor(anchors)
        tgt_pos = ctx[:, None] + torch.arange(1, B)[None]  # [G, B-1] positions the drafts predict
        tgt = torch.where(tgt_pos < T, it["ids"][tgt_pos.clamp(max=T - 1)], torch.full_like(tgt_pos, -100))
        out.append((it, ctx, tgt, it["ids"][ctx]))
    return out


def position_weights(num_slots: int, pos_decay: float) -> torch.Tensor:
    """[num_slots] loss weights of draft slots 1..num_slots (see TrainConfig.pos_decay)."""
    k = torch.arange(num_slots, dtype=torch.float32)
    return torch.exp(-k / pos_decay) if pos_decay > 0 else torch.ones(num_slots)


def collate(samples: list[tuple]) -> tuple[torch.Tensor, ...]:
    """block_batch's per-sequence samples -> one padded batch.

    Returns kv [n_deep, 2, N, T, Hkv, D] (zero past each sequence's end; a
    block never sees past its anchor, so padding is never attended),
    ctx [N, G], tgt [N, G, B-1], bonus [N, G].
    """
    T = max(it["ids"].numel() for it, *_ in samples)
    kv0 = samples[0][0]["kv"]
    kv = kv0.new_zeros(kv0.shape[0], 2, len(samples), T, *kv0.shape[3:])
    for i, (it, *_) in enumerate(samples):
        kv[:, :, i, : it["kv"].shape[2]] = it["kv"]
    ctx, tgt, bonus = (torch.stack([smp[j] for smp in samples]) for j in (1, 2, 3))
    return kv, ctx, tgt, bonus


def draft_forward(
    target: TargetAdapter,
    drafter: FlexDraftDrafter,
    kv: torch.Tensor,  # [n_deep, 2, N, T, Hkv, D] frozen real-token K/V of N sequences
    ctx: torch.Tensor,  # [N, G] anchors (bonus slots): block (n, g) sees real tokens [0, ctx[n, g])
    block: int | None = None,  # masks per block (default block_size; fewer: a trimmed block)
    bonus_emb: torch.Tensor | None = None,  # [N*G, h] bonus embeddings (bonus_in_block; zero rows: none)
) -> torch.Tensor:  # [N*G, B, hidden] final-normed mask hidden
    N, G = ctx.shape
    s = drafter.config.split_layer

    def attend_for(l: int):
        k_ctx, v_ctx = kv[l - s, 0], kv[l - s, 1]

        def attend(q, k, v):  # [N*G, B, H, D] -> [N*G, B, Hq, D]
            split = lambda t: t.reshape(N, G, *t.shape[1:])  # noqa: E731
            return batched_block_attention(split(q), split(k), split(v), k_ctx, v_ctx, ctx,
                                           target.scale).flatten(0, 1)
        return attend

    return drafter.draft_hidden(target, ctx.reshape(-1), attend_for, block=block, bonus_emb=bonus_emb)


def step_loss(
    target: TargetAdapter,
    drafter: FlexDraftDrafter,
    batch: tuple[torch.Tensor, ...],
    calibrated: bool,
    pos_decay: float,
    bonus_rate: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Weighted CE of the draft slots of one padded batch, plus counts for logging.

    bonus_rate: share of blocks that start from their bonus (a bonus_in_block
    drafter; drawn from torch's RNG, which the training state saves); the rest
    run as a parallel pass does, without it."""
    kv, ctx, tgt, bonus = batch
    emb = None
    if drafter.bonus_proj is not None and bonus_rate > 0:
        emb = target.embed(bonus.reshape(-1))  # [N*G, h]
        if bonus_rate < 1:
            emb = emb * (torch.rand(emb.shape[0], 1, device=emb.device) < bonus_rate).to(emb.dtype)
    h = draft_forward(target, drafter, kv, ctx, bonus_emb=emb)[:, 1:]  # [N*G, B-1, h]: slot 0 is the bonus slot
    tgt = tgt.reshape(h.shape[:2])  # [N*G, B-1]
    valid = tgt != -100
    local = draft_vocab_index(drafter, tgt)[valid]  # [M] target as a draft-logit index, -1 if not draftable
    w = position_weights(tgt.shape[1], pos_decay)[None].expand_as(tgt)[valid] * (local >= 0)  # [M]
    rows = h[valid]  # [M, h]: only rows with a target reach the (large) LM head
    if calibrated:
        anchor = calib_anchors(drafter.config.calib_anchor, bonus.reshape(-1), tgt)[valid]
        logits = drafter.draft_logits(target, rows, anchor)
    else:
        logits = rows @ drafter.head_weight(target).t()
    logits = logits.float()  # fp32 softmax under bf16 autocast (argmax is also faster in fp32 on CPU)
    ce = F.cross_entropy(logits, local.clamp(min=0), reduction="none") * (local >= 0)  # [M]
    # accuracy counts every real target: one outside the draft vocabulary is a miss
    hit = logits.detach().argmax(-1) == local  # [M]
    first = torch.nonzero(valid)[:, 1] == 0  # [M] row is draft slot 1 (the one decoding accepts first)
    lead = leading_hits(valid, hit)
    stats = {"ce_sum": float(ce.detach().sum()), "n": int((local >= 0).sum()), "correct": int(hit.sum()),
             "correct1": int((hit & first).sum()), "n1": int(first.sum()),
             "lead_sum": int(lead.sum()), "blocks": int(lead.numel())}
    return (ce * w).sum() / w.sum().clamp(min=1e-6), stats


def leading_hits(
    valid: torch.Tensor,  # [R, K] bool: draft slot has a target in the sequence
    hit: torch.Tensor,  # [M] bool: top-1 hit of each valid slot, row-major (M = valid.sum())
) -> torch.Tensor:  # [blocks] run of leading hits of each block whose K slots are all valid
    """Teacher-forced accepted drafts: what greedy verification of all K drafts
    would accept (accepted length = 1 + this, the bonus included)."""
    grid = torch.zeros_like(valid)
    grid[valid] = hit
    return grid[valid.all(1)].int().cumprod(1).sum(1)


def calib_anchors(
    kind: str,
    bonus: torch.Tensor,  # [M] true bonus of each block
    tgt: torch.Tensor,  # [M, K] true tokens of draft slots 1..K (-100 past the sequence's end)
) -> torch.Tensor:  # [M, K] the token each slot's calibration is anchored on
    """Teacher forcing: "chain" anchors slot k on the TRUE token of slot k-1. In
    decoding the anchor is the previous draft, which equals it whenever slot k
    can be accepted at all (every earlier draft accepted)."""
    if kind == "bonus":
        return bonus[:, None].expand_as(tgt)
    return torch.cat([bonus[:, None], tgt[:, :-1].clamp(min=0)], 1)  # a row past the end is never scored


def draft_vocab_index(drafter: FlexDraftDrafter, tgt: torch.Tensor) -> torch.Tensor:
    """Token ids -> their index in the drafter's logits (-1: not in the draft vocabulary)."""
    if drafter.draft_vocab is None:
        return tgt
    index = torch.full((drafter.config.vocab_size,), -1, dtype=torch.long, device=tgt.device)
    index[drafter.draft_vocab] = torch.arange(drafter.draft_vocab.numel(), device=tgt.device)
    return torch.where(tgt >= 0, index[tgt.clamp(min=0)], -1)


def frequent_tokens(items: list[dict], k: int, vocab_size: int) -> torch.Tensor:
    """[k] ids of the k most frequent response tokens (ties: lower id first)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for it in items:
        counts += torch.bincount(it["ids"][it["prompt_len"]:], minlength=vocab_size)
    return torch.argsort(-counts, stable=True)[:k]


@torch.no_grad()
def mean_split_hidden(target: TargetAdapter, items: list[dict], split_layer: int) -> torch.Tensor:
    """Mean real hidden state entering the split layer: a neutral start for mask_embedding."""
    hs = [target.hf(it["ids"][None], output_hidden_states=True).hidden_states[split_layer][0] for it in items]
    return torch.cat(hs).mean(0)


def _save_state(path: Path, drafter, opt, stage: str, step: int, rng: random.Random) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"drafter": drafter.state_dict(), "opt": opt.state_dict(), "stage": stage, "step": step,
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)


@torch.no_grad()
def heldout_scores(target, drafter, batch, calibrated: bool, autocast, bonus_rate: float = 1.0) -> tuple[float, float]:
    """(top-1 accuracy of draft slot 1, teacher-forced accepted length) on a fixed
    held-out batch: the overfitting check, and the figure decoding speed follows.
    bonus_rate 1: blocks as a sequential pass runs them; 0: as a parallel pass."""
    with autocast:
        _, st = step_loss(target, drafter, batch, calibrated, 0.0, bonus_rate)
    return st["correct1"] / max(st["n1"], 1), 1 + st["lead_sum"] / max(st["blocks"], 1)


def run_stage(stage: str, target, drafter, items, cfg: TrainConfig, state_path: Path, resume: dict | None,
              heldout: list[dict] = ()) -> None:
    steps = cfg.tune_steps if stage == "tune" else cfg.calib_steps
    if stage == "tune":
        params = [drafter.mask_embedding, *drafter.mask_attn.parameters()]
        if drafter.bonus_proj is not None:
            params += list(drafter.bonus_proj.parameters())
        if cfg.joint:
            params += list(drafter.calibrator.parameters())
        lr = cfg.lr_tune
    else:
        params = list(drafter.calibrator.parameters())
        lr = cfg.lr_calib
    for p in drafter.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / max(steps, 1)))
    rng = random.Random(cfg.seed + (0 if stage == "tune" else 1))
    start = 0
    if resume and resume["stage"] == stage:
        opt.load_state_dict(resume["opt"])
        rng.setstate(resume["rng"])
        torch.set_rng_state(resume["torch_rng"])
        start = resume["step"]
        for _ in range(start):
            sched.step()
    bar = tqdm(range(start, steps), desc=f"[train] {stage}", initial=start, total=steps)
    autocast = torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    calibrated = stage == "calib" or cfg.joint
    ema = ema1 = None
    val_batch = collate(block_batch(list(heldout), random.Random(cfg.seed), cfg)) if heldout else None
    for step in bar:
        opt.zero_grad(set_to_none=True)
        batch = collate(block_batch(items, rng, cfg))
        with autocast:
            loss, st = step_loss(target, drafter, batch, calibrated, cfg.pos_decay, 1.0 - cfg.bonus_drop)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        cur, cur1 = st["ce_sum"] / max(st["n"], 1), st["correct1"] / max(st["n1"], 1)
        ema = cur if ema is None else 0.95 * ema + 0.05 * cur
        ema1 = cur1 if ema1 is None else 0.95 * ema1 + 0.05 * cur1
        # loss is logged unweighted (comparable across pos_decay); acc1 = top-1 of draft slot 1
        bar.set_postfix(loss=f"{ema:.3f}", acc=f"{st['correct'] / max(st['n'], 1):.2f}", acc1=f"{ema1:.3f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            _save_state(state_path, drafter, opt, stage, step + 1, rng)
            if val_batch is not None:
                acc1, mal = heldout_scores(target, drafter, val_batch, calibrated, autocast)
                msg = f"held-out acc1 {acc1:.3f}, teacher-forced accepted length {mal:.2f}"
                if drafter.bonus_proj is not None:  # above: sequential passes; here: parallel ones
                    acc1, mal = heldout_scores(target, drafter, val_batch, calibrated, autocast, 0.0)
                    msg += f" (without the bonus, as a parallel pass: {acc1:.3f}, {mal:.2f})"
                bar.write(f"[train] {stage} step {step + 1}: train acc1 {ema1:.3f}, {msg}")


def seed_drafter(drafter: FlexDraftDrafter, cfg: TrainConfig, target) -> FlexDraftDrafter:
    """Load cfg.init_from's weights into `drafter` (fp32). A plain drafter may
    seed a bonus_in_block one: its bonus_proj stays at zero, the plain block."""
    start = FlexDraftDrafter.load(cfg.init_from, target)
    missing, unexpected = drafter.load_state_dict(drafter.cast_weights(start.state_dict(), torch.float32),
                                                  strict=False)
    if unexpected or set(missing) - {"bonus_proj.weight"}:
        raise SystemExit(f"init_from {cfg.init_from} does not fit this configuration "
                         f"(missing {missing}, unexpected {unexpected})")
    return drafter


def train(cfg: TrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target_dir = cfg.target or str(default_model_dir())
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    seq_file = build_dataset(target_dir, work, cfg.num_prompts, cfg.max_new_tokens, cfg.prompts_jsonl, cfg.seed,
                             cfg.extra_prompts_jsonl, cfg.extra_prompts)
    target = load_target(target_dir)
    stamp = Path(target_dir) / "flexdraft_prepared.json"
    meta = json.loads(stamp.read_text()) if stamp.exists() else {}
    fcfg = FlexDraftConfig.for_target(
        target.cfg, split_layer=cfg.split_layer, block_size=cfg.block_size,
        target_model_id=meta.get("model_id", target_dir),
        target_fingerprint=meta.get("weights_sha256_16") or weights_fingerprint(target_dir),
        calibrator=cfg.calibrator, calib_rank=cfg.calib_rank, calib_anchor=cfg.calib_anchor,
        draft_vocab_size=cfg.draft_vocab_size, bonus_in_block=cfg.bonus_in_block,
    )
    shards = build_kv_shards(target, seq_file, fcfg.deep_layers)
    items = _load_shards(shards)
    heldout = items[len(items) - cfg.holdout_seqs:] if cfg.holdout_seqs else []
    items = items[: len(items) - len(heldout)]
    print(f"[train] {len(items)} sequences, {sum(i['ids'].numel() - i['prompt_len'] for i in items)} response tokens", flush=True)

    drafter = FlexDraftDrafter(fcfg, target)
    state_path = work / cfg.state_file
    resume = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if resume:
        drafter.load_state_dict(resume["drafter"])
        print(f"[train] resuming {resume['stage']} at step {resume['step']}", flush=True)
    elif cfg.init_from:
        seed_drafter(drafter, cfg, target)
        print(f"[train] starting from the drafter in {cfg.init_from}", flush=True)
    else:
        with torch.no_grad():
            drafter.mask_embedding.copy_(mean_split_hidden(target, items[:16], fcfg.split_layer))
        if cfg.draft_vocab_size:
            vocab = frequent_tokens(items, cfg.draft_vocab_size, fcfg.vocab_size)
            drafter.set_draft_vocab(vocab)
            n = sum(int(torch.isin(it["ids"][it["prompt_len"]:], vocab).sum()) for it in heldout)
            total = sum(it["ids"].numel() - it["prompt_len"] for it in heldout)
            print(f"[train] draft vocabulary: {cfg.draft_vocab_size} tokens cover {n / max(total, 1):.3%} "
                  f"of the held-out response tokens", flush=True)
    if not resume or resume["stage"] == "tune":
        run_stage("tune", target, drafter, items, cfg, state_path, resume, heldout)
        resume = None
    run_stage("calib", target, drafter, items, cfg, state_path, resume, heldout)
    drafter.save(cfg.out, dtype=torch.float16)
    (Path(cfg.out) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    print(f"[train] drafter saved to {cfg.out} ({time.time() - t0:.0f} s)", flush=True)
    return Path(cfg.out)


def _flag(text: str) -> bool:
    """--joint true/false (argparse's type=bool would read "false" as True)."""
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file with TrainConfig fields")
    for f in fields(TrainConfig):
        if f.name != "target":
            kind = type(f.default) if f.default is not None else str
            ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_flag if kind is bool else kind)
    ap.add_argument("--target", dest="target")
    args = vars(ap.parse_args(argv))
    path = args.pop("config")
    train(TrainConfig.load(path, args))


if __name__ == "__main__":
    main()
