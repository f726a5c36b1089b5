"""Train a FlexDraft drafter for a target (attention tuning + calibration).

  python -m flexdraft_vllm.training.train --config flexdraft_vllm/configs/smollm2_135m.json

Stages (each resumable; state in <work_dir>/train_state.pt):
  data     self-distillation sequences + frozen deep-layer K/V (training/data.py)
  tune     mask_embedding + deep-layer mask projectors; loss = CE of each draft
           mask (slots 1..B-1 of a block anchored at a random response position
           p) against the target's own token at that position, uncalibrated.
  calib    calibration MLP only, anchored on the true bonus token x_p.
Only the drafter is trained; the target is frozen throughout.
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
from flexdraft_vllm.reference.drafter import FlexDraftDrafter, dense_block_attend
from flexdraft_vllm.reference.target import TargetAdapter, load_target
from flexdraft_vllm.training.data import build_dataset, build_kv_shards


@dataclass
class TrainConfig:
    target: str = ""  # prepared target folder ("" = the project's SmolLM2)
    out: str = "flexdraft_vllm/drafters/smollm2-135m"
    work_dir: str = ".cache/train/smollm2-135m"
    prompts_jsonl: str | None = None
    num_prompts: int = 600
    max_new_tokens: int = 256
    split_layer: int = 20
    block_size: int = 8
    calibrator: str = "tied"
    calib_rank: int = 256
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
    save_every: int = 50
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


def draft_forward(target: TargetAdapter, drafter: FlexDraftDrafter, it: dict, ctx: torch.Tensor) -> torch.Tensor:
    kv = it["kv"].float()  # [n_deep, 2, T, Hkv, D]
    s = drafter.config.split_layer
    return drafter.draft_hidden(
        target, ctx, lambda l: dense_block_attend(kv[l - s, 0], kv[l - s, 1], ctx, target.scale))


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


def run_stage(stage: str, target, drafter, items, cfg: TrainConfig, state_path: Path, resume: dict | None) -> None:
    steps = cfg.tune_steps if stage == "tune" else cfg.calib_steps
    if stage == "tune":
        params = [drafter.mask_embedding, *drafter.mask_attn.parameters()]
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
    ema = None
    for step in bar:
        loss_sum, n_sum, correct = 0.0, 0, 0
        opt.zero_grad(set_to_none=True)
        for it, ctx, tgt, bonus in block_batch(items, rng, cfg):
            if stage == "tune":
                h = draft_forward(target, drafter, it, ctx)[:, 1:]  # [G, B-1, h]
                logits = h @ target.lm_head_weight.t()
            else:
                with torch.no_grad():
                    h = draft_forward(target, drafter, it, ctx)[:, 1:]
                logits = drafter.draft_logits(target, h, bonus[:, None].expand(-1, h.shape[1]))
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                 reduction="none").view_as(tgt)  # [G, B-1], 0 where ignored
            w = position_weights(tgt.shape[1], cfg.pos_decay)[None].expand_as(ce) * (tgt != -100)
            n = int((tgt != -100).sum())
            ((ce * w).sum() / w.sum().clamp(min=1e-6) / cfg.seqs_per_step).backward()
            loss = ce.sum()  # logged unweighted, comparable across pos_decay settings
            loss_sum += float(loss)
            n_sum += n
            correct += int(((logits.argmax(-1) == tgt) & (tgt != -100)).sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        cur = loss_sum / max(n_sum, 1)
        ema = cur if ema is None else 0.95 * ema + 0.05 * cur
        bar.set_postfix(loss=f"{ema:.3f}", acc=f"{correct / max(n_sum, 1):.2f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            _save_state(state_path, drafter, opt, stage, step + 1, rng)


def train(cfg: TrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target_dir = cfg.target or str(default_model_dir())
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    seq_file = build_dataset(target_dir, work, cfg.num_prompts, cfg.max_new_tokens, cfg.prompts_jsonl, cfg.seed)
    target = load_target(target_dir)
    stamp = Path(target_dir) / "flexdraft_prepared.json"
    meta = json.loads(stamp.read_text()) if stamp.exists() else {}
    fcfg = FlexDraftConfig.for_target(
        target.cfg, split_layer=cfg.split_layer, block_size=cfg.block_size,
        target_model_id=meta.get("model_id", target_dir),
        target_fingerprint=meta.get("weights_sha256_16") or weights_fingerprint(target_dir),
        calibrator=cfg.calibrator, calib_rank=cfg.calib_rank,
    )
    shards = build_kv_shards(target, seq_file, fcfg.deep_layers)
    items = _load_shards(shards)
    print(f"[train] {len(items)} sequences, {sum(i['ids'].numel() - i['prompt_len'] for i in items)} response tokens", flush=True)

    drafter = FlexDraftDrafter(fcfg, target)
    state_path = work / cfg.state_file
    resume = torch.load(state_path, weights_only=False) if state_path.exists() else None
    if resume:
        drafter.load_state_dict(resume["drafter"])
        print(f"[train] resuming {resume['stage']} at step {resume['step']}", flush=True)
    elif cfg.init_from:
        start = FlexDraftDrafter.load(cfg.init_from, target)
        drafter.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
        print(f"[train] starting from the drafter in {cfg.init_from}", flush=True)
    else:
        with torch.no_grad():
            drafter.mask_embedding.copy_(mean_split_hidden(target, items[:16], fcfg.split_layer))
    if not resume or resume["stage"] == "tune":
        run_stage("tune", target, drafter, items, cfg, state_path, resume)
        resume = None
    run_stage("calib", target, drafter, items, cfg, state_path, resume)
    drafter.save(cfg.out, dtype=torch.float16)
    (Path(cfg.out) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    print(f"[train] drafter saved to {cfg.out} ({time.time() - t0:.0f} s)", flush=True)
    return Path(cfg.out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file with TrainConfig fields")
    for f in fields(TrainConfig):
        if f.name != "target":
            ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default) if f.default is not None else str)
    ap.add_argument("--target", dest="target")
    args = vars(ap.parse_args(argv))
    path = args.pop("config")
    train(TrainConfig.load(path, args))


if __name__ == "__main__":
    main()
