"""Interleaved sweep: every method's engine alive at once, cells taken in turns.

  python benchmarks/interleaved.py --name cpu-interleaved

Why: on a shared 2-CPU machine the speed drifts by up to 20% within minutes
(benchmarks/results/cpu-2core-epyc-r7: plain run again at the end of the
sweep was 0.80-1.02x of plain at the start). offline_sweep.py runs one method
after another, so a method's ratio carries the drift between its slot and
plain's. Here all engines are started first, in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0; identical engine settings), and for each
batch size the cells run in rounds: every method once per round, in an order
rotated from round to round. A method's ratio in a round is its tok/s over
plain's in the same round (a paired measurement, minutes apart at most);
the table gives the median over rounds and the range, so a drift shows as a
wide range instead of a false speedup.

A cell is offline_sweep.run_cell: `batch` requests in flight under continuous
admission, greedy, a fixed max_tokens, an excluded warm-up group first. Every
round uses the same prompts, so every method's greedy outputs are checked
against plain's (lossless check) in every round.

Results: benchmarks/results/<name>/results.json (each cell as it finishes;
rerunning the same command resumes at the first unfinished round), table.md,
speedup.png (median ratio per batch size, bars = range over rounds).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import offline_sweep as sweep  # noqa: E402
import report  # noqa: E402

DEFAULT_METHODS = ["plain", "ngram", "flexdraft-flex", "flexdraft-lookup"]
KIND = "interleaved_sweep"


# ---- pure parts (unit-tested) ---------------------------------------------------------------
def round_order(methods: list[str], rnd: int) -> list[str]:
    """The methods of round `rnd`, rotated by `rnd`: no method always runs
    right after the same one, and each takes every slot of a round in turn."""
    k = rnd % len(methods)
    return methods[k:] + methods[:k]


def cell_key(batch: int, rnd: int, method: str) -> str:
    return f"b{batch}/r{rnd}/{method}"


def paired_ratios(cells: dict[str, dict], method: str, batch: int, rounds: int,
                  base: str = report.BASELINE) -> list[float]:
    """method tok/s / plain tok/s of the same round, for the rounds where both ran."""
    out = []
    for r in range(rounds):
        a, b = cells.get(cell_key(batch, r, method)), cells.get(cell_key(batch, r, base))
        if a and b and a.get("output_tok_s") and b.get("output_tok_s"):
            out.append(a["output_tok_s"] / b["output_tok_s"])
    return out


def ratio_summary(xs: list[float]) -> dict[str, float | int] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": len(xs)}


def summarize(results: dict[str, Any]) -> dict[str, dict[int, dict]]:
    """method -> batch -> {ratio summary, median tok/s, lossless, policy steps}."""
    cfg, cells = results["config"], results["cells"]
    out: dict[str, dict[int, dict]] = {}
    for m in cfg["methods"]:
        for b in cfg["batches"]:
            runs = [cells[k] for r in range(cfg["rounds"]) if (k := cell_key(b, r, m)) in cells]
            if not runs:
                continue
            out.setdefault(m, {})[b] = {
                "ratio": ratio_summary(paired_ratios(cells, m, b, cfg["rounds"])),
                "tok_s": statistics.median(c["output_tok_s"] for c in runs),
                "lossless": all(c.get("same_as_plain", True) for c in runs),
                "rounds": len(runs),
                "policy": [report.policy_steps(c.get("policy")) for c in runs if c.get("policy")],
            }
    return out


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    s = summarize(results)
    methods = [m for m in cfg["methods"] if m in s]
    lines = ["# Interleaved sweep", ""]
    runs = results.get("runs") or []
    if runs:
        lines += [f"Machine: {report.describe_machine(runs[-1]['machine'])}.", "",
                  f"Command: `{runs[-1]['command']}`", ""]
    lines += [f"Settings: {', '.join(f'{k}={v}' for k, v in cfg.items() if k not in ('prompts_sha', 'methods'))}", "",
              "All engines alive in one process; per batch size, rounds of one cell per method in rotated order. "
              "Ratio = the method's tok/s over plain's in the same round; median over rounds [min - max]. "
              "Greedy outputs compared with plain's in every round (* = a cell differed).", ""]
    head = ["batch", "plain tok/s"] + [m for m in methods if m != report.BASELINE]
    rows = []
    for b in cfg["batches"]:
        p = s.get(report.BASELINE, {}).get(b)
        row = [str(b), report._fmt(p["tok_s"]) if p else "-"]
        for m in head[2:]:
            c = s.get(m, {}).get(b)
            r = c and c["ratio"]
            row.append("-" if not r else f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"
                       + ("" if c["lossless"] else " *"))
        rows.append(row)
    lines += [report._table(head, rows), ""]
    spec = [m for m in methods if m != report.BASELINE]
    flex = [m for m in spec if m.startswith("flexdraft-")]
    if flex:
        lines += ["FlexDraft policy steps parallel/sequential/off, per round (accepted lengths: run offline_sweep.py; "
                  "vLLM's spec-decode counters live in one Prometheus registry per process, which engines "
                  "started later take over, so they are not read here):", ""]
        rows = [[str(b)] + [", ".join(s.get(m, {}).get(b, {}).get("policy") or ["-"]) for m in flex]
                for b in cfg["batches"]]
        lines += [report._table(["batch"] + flex, rows), ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], out_dir: Path) -> Path | None:
    s = summarize(results)
    spec = [m for m in results["config"]["methods"] if m != report.BASELINE and m in s]
    if not spec:
        return None
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in spec:
        pts = sorted((b, c["ratio"]) for b, c in s[m].items() if c["ratio"])
        if not pts:
            continue
        xs = [b for b, _ in pts]
        med = [r["median"] for _, r in pts]
        err = [[r["median"] - r["min"] for _, r in pts], [r["max"] - r["median"] for _, r in pts]]
        ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=m)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="plain vLLM")
    ax.set_xscale("log", base=2)
    report._xticks(ax, results["config"]["batches"])
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("speedup vs plain vLLM (same round)")
    ax.set_title(f"Interleaved sweep (median over rounds, bars = range)\n{report._subtitle(results)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "speedup.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- measuring ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="interleaved", help="results folder name under --results-root")
    ap.add_argument("--results-root", type=Path, default=report.RESULTS_ROOT)
    ap.add_argument("--methods", type=sweep.parse_methods, default=DEFAULT_METHODS,
                    help=f"comma-separated, plain included (default {','.join(DEFAULT_METHODS)}); "
                         "suffix methods are not offered here (their engine needs arctic-inference's overlay)")
    ap.add_argument("--batches", type=sweep.parse_int_list, default=sweep.DEFAULT_BATCHES)
    ap.add_argument("--rounds", type=int, default=3, help="cells per method and batch size")
    ap.add_argument("--model", type=Path, default=None, help="target model folder (default: the prepared SmolLM2)")
    ap.add_argument("--prompts", default="mixed", help="humaneval | chat | mixed | path to a JSONL of {\"prompt\": ...}")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-requests", type=int, default=8, help="requests per cell at least")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=1.0, help="KV cache per engine (all engines live at once)")
    ap.add_argument("--fresh", action="store_true", help="discard stored cells of this --name and start over")
    return ap


def _config(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    return {"methods": args.methods, "batches": args.batches, "rounds": args.rounds, "model": str(args.model),
            "prompts": args.prompts, "num_prompts": len(prompts), "min_requests": args.min_requests,
            "max_tokens": args.max_tokens, "warmup_tokens": args.warmup_tokens, "ignore_eos": args.ignore_eos,
            "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_gib, "admission": "continuous",
            "temperature": 0.0,
            "prompts_sha": report.prompts_digest(prompts)}


def _start_engines(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    llms = {}
    # ngram last: at worker start vLLM 0.32 rebinds Triton kernels by scanning every loaded module
    # (triton_utils/dispatcher._rebind_kernels) and raises AttributeError on an object of a module
    # the ngram proposer brings in (llvmlite's '_lib_fn_wrapper', via numba); started last, no engine scans after it
    for m in sorted(args.methods, key=lambda m: m == "ngram"):
        t0 = time.perf_counter()
        llms[m] = LLM(model=str(args.model), **sweep.method_engine_kwargs(m, base))
        sweep._run_group(llms[m], ["Hello"], SamplingParams(temperature=0.0, max_tokens=8))  # first-call costs
        print(f"[engine] {m} up in {time.perf_counter() - t0:.0f} s", flush=True)
    return llms


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if report.BASELINE not in args.methods:
        sys.exit("--methods must include plain: every ratio is against plain in the same round")
    if any(m in report.SUFFIX_METHODS for m in args.methods):
        sys.exit("suffix methods need arctic-inference's overlay on the path: use offline_sweep.py for them")
    if args.rounds < 1:
        sys.exit("--rounds must be >= 1")
    # in-process engine cores, before vLLM is imported: all engines share this process
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["FLEXDRAFT_KV_GIB"] = str(args.kv_gib)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flexdraft_vllm.prepare import default_model_dir

    args.model = (args.model or default_model_dir()).resolve()
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `./run.sh demo` once (or python -m flexdraft_vllm.prepare)")
    _, prompts, _ = sweep.select_prompts(args)
    out_dir = args.results_root / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / "results.json"
    config = _config(args, prompts)
    results, _ = report.resume_or_new(res_path, KIND, config, args.fresh)
    machine = report.machine_info()
    results["runs"].append({"started": report.now(), "command": shlex.join([sys.executable, *sys.argv]),
                            "machine": machine, "ld_preload": os.environ.get("LD_PRELOAD")})
    report.save_results(res_path, results)
    print(f"interleaved sweep '{args.name}' -> {out_dir}\nmachine: {report.describe_machine(machine)}")
    warn = report.busy_warning(machine)
    if warn:
        print(warn)

    from flexdraft_vllm.engine_defaults import default_engine_kwargs

    base = default_engine_kwargs(max_model_len=args.max_model_len, max_num_seqs=max(64, *args.batches),
                                 disable_log_stats=False)
    llms = _start_engines(args, base)
    spec = {"max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "min_requests": args.min_requests,
            "warmup_tokens": args.warmup_tokens, "admission": "continuous"}
    cells = results["cells"]
    outputs: dict[str, list] = {}  # this invocation's plain outputs per (batch, round), for the lossless check
    try:
        for b in args.batches:
            for r in range(args.rounds):
                for m in round_order(args.methods, r):
                    key = cell_key(b, r, m)
                    if key in cells:
                        continue
                    rec, toks = sweep.run_cell(llms[m], prompts, b, spec, is_flex=m.startswith("flexdraft-"))
                    # vLLM's metrics registry is per process and the last engine started owns it: the
                    # spec-decode and preemption deltas run_cell reads are not this engine's
                    rec.pop("spec", None)
                    rec.pop("preemptions", None)
                    if m == report.BASELINE:
                        outputs[f"{b}/{r}"] = toks
                        for other in args.methods:  # cells of this round that ran before plain
                            c = cells.get(cell_key(b, r, other))
                            if c is not None and "_toks" in c:
                                c["same_as_plain"] = c.pop("_toks") == toks
                    ref = outputs.get(f"{b}/{r}")
                    if m != report.BASELINE:
                        if ref is not None:
                            rec["same_as_plain"] = toks == ref
                        else:
                            rec["_toks"] = toks  # compared once plain's cell of this round has run
                    cells[key] = rec
                    report.save_results(res_path, results)
                    print(f"[b{b} r{r}] {m}: {rec['output_tok_s']:.1f} tok/s"
                          + (f", steps P/S/off {report.policy_steps(rec['policy'])}" if rec.get("policy") else "")
                          + ("" if rec.get("same_as_plain", True) else "  OUTPUT DIFFERS FROM PLAIN"), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells are saved; rerun the same command to resume")
    for c in cells.values():
        c.pop("_toks", None)  # plain's cell of that round never ran: unchecked, not kept
    results["runs"][-1]["finished"] = report.now()
    results["summary"] = {m: {str(b): v for b, v in d.items()} for m, d in summarize(results).items()}
    report.save_results(res_path, results)
    (out_dir / "table.md").write_text(markdown(results))
    png = plot(results, out_dir)
    print()
    print((out_dir / "table.md").read_text())
    print("written:", ", ".join(str(p) for p in [res_path, out_dir / "table.md", png] if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
