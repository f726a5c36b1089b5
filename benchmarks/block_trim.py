"""Does a trimmed mask block draft as well as the full one? (teacher-forced, held out)

  python benchmarks/block_trim.py --drafter flexdraft_vllm/drafters/smollm2-135m \\
      --work-dir .cache/train/smollm2-135m-r4 --blocks 8,5,4,3,2
  python benchmarks/block_trim.py --work-dir .cache/eval/heldout-s99 --make-heldout 48 --prompt-seed 99

vLLM runs a block of cap + 1 masks for a step that verifies at most `cap`
drafts (config.trimmed_block), not the drafter's full block_size. Masks share
their block bidirectionally, so the masks past the last verified draft could
still matter to the ones before them. This measures it: the last `--holdout`
sequences of a training work dir (the ones training held out; their frozen
deep-layer K/V are in its kv_s<split> shards; or, with --make-heldout N, N new
self-distilled sequences made there by training's data stage from prompts the
target synthesises with --prompt-seed, a seed no training config uses, so
none of them was trained on), `--blocks-per-seq` random anchors
each, every draft slot's top-1 accuracy against the target's own token, per
block length. The same anchors for every length.

Writes benchmarks/results/drafter-eval/block-trim.{json,md} (--out to change).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402


@torch.no_grad()
def slot_accuracy(target, drafter, batch, block: int) -> list[float]:
    """Top-1 accuracy of draft slots 1..block-1 with blocks of `block` masks."""
    from flexdraft_vllm.training import train as T

    kv, ctx, tgt, bonus = batch
    h = T.draft_forward(target, drafter, kv, ctx, block)[:, 1:]  # [N*G, block-1, h]
    t = tgt.reshape(h.shape[0], -1)[:, : block - 1]
    valid = t != -100
    anchor = T.calib_anchors(drafter.config.calib_anchor, bonus.reshape(-1), t)
    hit = (drafter.draft_logits(target, h, anchor).float().argmax(-1) == T.draft_vocab_index(drafter, t)) & valid
    return [float(hit[:, j].sum() / valid[:, j].sum().clamp(min=1)) for j in range(block - 1)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="flexdraft_vllm/drafters/smollm2-135m")
    ap.add_argument("--work-dir", required=True, help="a training work dir (sequences.jsonl + kv_s<split>/)")
    ap.add_argument("--holdout", type=int, default=24, help="last N sequences (training's holdout_seqs)")
    ap.add_argument("--make-heldout", type=int, default=0,
                    help="make N sequences in --work-dir first (training's data stage; resumes; sets --holdout N)")
    ap.add_argument("--prompt-seed", type=int, default=99, help="prompt synthesis seed for --make-heldout")
    ap.add_argument("--max-new-tokens", type=int, default=192, help="answer length for --make-heldout")
    ap.add_argument("--blocks-per-seq", type=int, default=24)
    ap.add_argument("--blocks", default="8,5,4,3,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=report.RESULTS_ROOT / "drafter-eval" / "block-trim")
    args = ap.parse_args(argv)

    from flexdraft_vllm.prepare import default_model_dir
    from flexdraft_vllm.reference.drafter import FlexDraftDrafter
    from flexdraft_vllm.reference.target import load_target
    from flexdraft_vllm.training import train as T

    model_dir = str(default_model_dir())
    target = load_target(model_dir)
    drafter = FlexDraftDrafter.load(args.drafter, target).float()
    if args.make_heldout:
        from flexdraft_vllm.training.data import build_dataset, build_kv_shards

        seq_file = build_dataset(model_dir, args.work_dir, args.make_heldout, args.max_new_tokens,
                                 None, args.prompt_seed)
        build_kv_shards(target, seq_file, drafter.config.deep_layers)
        args.holdout = args.make_heldout
    shards = sorted((Path(args.work_dir) / f"kv_s{drafter.config.split_layer}").glob("shard_*.pt"))
    if not shards:
        sys.exit(f"no K/V shards under {args.work_dir}: run training's data stage first")
    items = []
    for p in reversed(shards):  # the last shards hold the held-out tail
        items = T._load_shards([p]) + items
        if len(items) >= args.holdout:
            break
    items = items[-args.holdout:]
    B = drafter.config.block_size
    cfg = T.TrainConfig(seqs_per_step=len(items), blocks_per_seq=args.blocks_per_seq, block_size=B)
    batch = T.collate(T.block_batch(items, random.Random(args.seed), cfg))
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = {b: slot_accuracy(target, drafter, batch, b) for b in blocks}
    for b, acc in rows.items():
        print(f"block {b}: slot accuracy {[round(a, 3) for a in acc]}", flush=True)

    out = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "drafter": args.drafter,
           "work_dir": args.work_dir, "sequences": len(items), "blocks_per_seq": args.blocks_per_seq,
           "machine": report.describe_machine(report.machine_info()), "slot_accuracy": {str(b): a for b, a in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    head = "| masks per block | " + " | ".join(f"slot {j}" for j in range(1, B)) + " |"
    md = [f"# Trimmed mask blocks: held-out draft accuracy (teacher-forced)", "",
          f"Command: `python {out['command']}`", "",
          f"{len(items)} held-out sequences x {args.blocks_per_seq} anchors; top-1 accuracy of each draft slot "
          "against the target's own token (the previous slots' true tokens as chain anchors). The same anchors "
          "for every block length.", "", head, "|" + "---|" * B]
    for b, acc in rows.items():
        md.append(f"| {b} | " + " | ".join(f"{a:.3f}" for a in acc) + " |" + " - |" * (B - b))
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("written:", args.out.with_suffix(".json"), args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
