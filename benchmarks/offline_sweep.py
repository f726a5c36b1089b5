"""Offline throughput sweep: FlexDraft against plain vLLM and vLLM's own
speculative methods, batch sizes 1..64, same prompts, same machine, one command.

  python benchmarks/offline_sweep.py --name cpu-sweep

Methods (--methods, comma-separated; default all):
  plain                 vLLM without speculative decoding (the baseline of every ratio)
  ngram                 vLLM prompt-lookup decoding
  suffix                vLLM suffix decoding (needs arctic-inference; see --suffix-pythonpath)
  suffix-nocache        the same without its tree of earlier requests (max_cached_requests 0): cells
                        reuse prompts, and greedy suffix decoding replays an output it has seen;
                        this one drafts from the request's own prompt and output only
  flexdraft-parallel    FlexDraft, parallel mode only  } FlexDraft's own drafts only
  flexdraft-sequential  FlexDraft, sequential mode only } (prompt_lookup_max=0: the
  flexdraft-flex        FlexDraft, the flex policy      } paper's method)
  flexdraft-lookup      FlexDraft flex plus prompt lookup (prompt_lookup_max=4, ours):
                        what flexdraft_engine_kwargs / flexdraft-vllm serve run by default

Each method runs in its own worker process with one engine (identical engine
settings from flexdraft_vllm.engine_defaults for all methods); the worker runs
every pending batch size. A method whose engine cannot start (missing package,
mode not supported in vLLM, ...) is recorded as "unavailable: <reason>" and the
sweep goes on.

Per (method, batch) cell: `batch` requests in flight, the next one submitted as
soon as one finishes (--admission continuous, the default; --admission group:
`batch` at a time, the next group after the previous one finished), greedy, a
fixed max_tokens;
a warm-up group at that batch size runs first and is excluded. Measured:
output tokens/s, per-request latency (mean/p50/p90), mean accepted length and
per-position acceptance (vLLM's spec-decode counters, deltas over the cell),
preemptions, FlexDraft's policy decisions (parallel/sequential/off steps), and the greedy
output tokens, which are checked against plain vLLM's at the same batch size
(lossless check).

Results go to benchmarks/results/<name>/: results.json, table.md, speedup.png,
throughput.png, logs/<method>.log, outputs/<method>_b<batch>.json. Rerunning
the same command resumes: finished cells are kept and skipped (--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

ALL_METHODS = [m for m in report.METHOD_ORDER if m != report.BASELINE_AGAIN]  # plain-again: see run_order
DEFAULT_METHODS = [m for m in ALL_METHODS if m not in report.DIAGNOSTIC_METHODS]
DEFAULT_BATCHES = [1, 2, 4, 8, 16, 32, 64]
PROGRESS = "@@progress "
NGRAM_DEFAULT = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
SUFFIX_DEFAULT = {"method": "suffix"}  # vLLM's defaults: tree depth 24, adaptive draft length
ARCTIC_OVERLAY = report.REPO / ".cache" / "arctic-inference"  # made by benchmarks/arctic_overlay.py


# ---- pure parts (unit-tested) ---------------------------------------------------------------
def parse_int_list(s: str) -> list[int]:
    out = [int(x) for x in s.replace(" ", "").split(",") if x]
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4: {s!r}")
    return out


def parse_methods(s: str) -> list[str]:
    ms = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in ms if m not in ALL_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {ALL_METHODS}")
    # baseline first, so every later method's ratio has its reference early
    return sorted(dict.fromkeys(ms), key=ALL_METHODS.index)


def run_order(methods: list[str], bracket: bool) -> list[str]:
    """The methods in the order their workers run: with `bracket`, plain again
    at the end (report.BASELINE_AGAIN) when plain and something else run."""
    others = [m for m in methods if m != report.BASELINE]
    if bracket and report.BASELINE in methods and others:
        return [*methods, report.BASELINE_AGAIN]
    return list(methods)


def cell_requests(batch: int, min_requests: int, continuous: bool = False) -> int:
    """Requests in a cell: at least min_requests and at least one full group
    (continuous admission: two, so most of the cell runs with the batch full),
    always a whole number of groups of `batch`."""
    n = max(batch * (2 if continuous else 1), min_requests)
    return -(-n // batch) * batch


def method_engine_kwargs(method: str, base: dict[str, Any], ngram: dict[str, Any] | None = None,
                         suffix: dict[str, Any] | None = None) -> dict[str, Any]:
    """The LLM(...) kwargs of a method: the shared base plus the method's speculative settings."""
    kw = dict(base)
    if method in (report.BASELINE, report.BASELINE_AGAIN):
        return kw
    if method == "ngram":
        kw["speculative_config"] = dict(ngram or NGRAM_DEFAULT)
    elif method == "suffix":
        kw["speculative_config"] = dict(suffix or SUFFIX_DEFAULT)
    elif method == "suffix-nocache":
        kw["speculative_config"] = {**(suffix or SUFFIX_DEFAULT), "suffix_decoding_max_cached_requests": 0}
    elif method == "flexdraft-lookup":  # flex plus prompt lookup (lookup.py), vLLM ngram's n-gram range
        from flexdraft_vllm.vllm_integration.speculative import flexdraft_engine_kwargs

        kw.update(flexdraft_engine_kwargs(mode="flex", prompt_lookup_max=4, prompt_lookup_min=2))
    elif method.startswith("flexdraft-"):  # FlexDraft's own drafts only: prompt lookup (on by default) off
        from flexdraft_vllm.vllm_integration.speculative import flexdraft_engine_kwargs

        kw.update(flexdraft_engine_kwargs(mode=method.removeprefix("flexdraft-"), prompt_lookup_max=0))
    else:
        raise ValueError(f"unknown method {method!r}")
    return kw


def lossless_check(results: dict[str, Any], out_dir: Path) -> None:
    """Compare each cell's greedy outputs with plain vLLM's at the same batch size;
    also plain at batch b against plain at the smallest batch (how much batching
    alone moves fp results on this machine). Annotates cells in place."""
    out_dir = Path(out_dir)

    def outputs(method: str, x: str) -> list | None:
        c = results["cells"].get(method, {}).get(x)
        if not report.is_ok(c) or not c.get("outputs_file"):
            return None
        p = out_dir / c["outputs_file"]
        return json.loads(p.read_text()) if p.is_file() else None

    def compare(a: list, b: list) -> dict[str, Any]:
        n = min(len(a), len(b))
        bad = [i for i in range(n) if a[i] != b[i]]
        return {"compared": n, "mismatches": len(bad), "first_mismatch": bad[0] if bad else None}

    plain_xs = sorted(results["cells"].get(report.BASELINE, {}), key=int)
    ref0 = outputs(report.BASELINE, plain_xs[0]) if plain_xs else None
    for method, cells in results["cells"].items():
        for x, c in cells.items():
            if not report.is_ok(c):
                continue
            mine = outputs(method, x)
            if method == report.BASELINE:  # plain-again is checked against plain like any method
                if ref0 is not None and mine is not None and x != plain_xs[0]:
                    c["vs_plain_smallest_batch"] = compare(mine, ref0)
                continue
            ref = outputs(report.BASELINE, x)
            c["lossless"] = compare(mine, ref) if (mine is not None and ref is not None) else {"note": "no plain reference"}


def sweep_config(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    """The settings every cell of a results file shares (resume checks them)."""
    return {
        "model": str(args.model),
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "prompt_sha256": report.prompts_digest(prompts),
        "max_tokens": args.max_tokens,
        "min_requests": args.min_requests,
        "warmup_tokens": args.warmup_tokens,
        "ignore_eos": args.ignore_eos,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "kv_cache_gib": args.kv_gib,
        "prefix_caching": args.prefix_caching,
        "engine_process": args.engine_process,
        "admission": args.admission,
        "temperature": 0.0,
    }


# ---- the worker: one engine, one method, its pending batch sizes --------------------------------
def _emit(inbox: Path, rec: dict[str, Any]) -> None:
    with open(inbox, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _say(msg: str) -> None:
    print(PROGRESS + msg, flush=True)


def _metrics_snapshot(llm) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode") or m.name == "vllm:num_preemptions":
            v = getattr(m, "values", None)
            snap[m.name] = list(v) if v is not None else getattr(m, "value", 0)
    return snap


def _delta(a: dict[str, Any], b: dict[str, Any], name: str):
    x, y = a.get(name, 0), b.get(name, 0)
    if isinstance(y, list):
        x = x if isinstance(x, list) else []
        return [yy - (x[i] if i < len(x) else 0) for i, yy in enumerate(y)]
    return (y or 0) - (x or 0)


def _policy_of(worker):  # runs inside the engine's worker process (collective_rpc)
    d = getattr(worker.model_runner, "drafter", None)
    pol = getattr(d, "policy", None)
    if pol is None:
        return None
    dr = getattr(d, "drafter", None)
    return {"chosen": dict(pol.chosen), "steps": pol.steps, "summary": pol.summary(),
            "draft_seconds": getattr(d, "draft_seconds", None),
            "draft_dtype": None if dr is None else str(dr.mask_embedding.dtype).removeprefix("torch.")}


def _policy(llm) -> dict | None:
    try:
        return llm.collective_rpc(_policy_of)[0]
    except Exception as e:  # noqa: BLE001 - observability only
        return {"error": f"{type(e).__name__}: {e}"}


def _run_group(llm, prompts: list[str], sp) -> tuple[list[Any], list[float], float]:
    """Submit one group together and step the engine until all finished,
    recording each request's completion time from the group's start."""
    from time import perf_counter

    t0 = perf_counter()
    ids = llm.enqueue(prompts, sp, use_tqdm=False)
    eng = llm.llm_engine
    done: dict[str, tuple[Any, float]] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = (o, perf_counter() - t0)
    wall = perf_counter() - t0
    ordered = _in_submission_order(ids, done)
    return [o for o, _ in ordered], [t for _, t in ordered], wall


def _in_submission_order(ids: list[str], done: dict[str, tuple[Any, float]]) -> list[tuple[Any, float]]:
    """done (engine request id -> (output, time)) in the order `ids` were submitted."""
    if ids and all(i in done for i in ids):
        return [done[i] for i in ids]
    # request ids renamed inside the engine: their counter prefix is the submission order
    return sorted(done.values(), key=lambda t: int(str(t[0].request_id).split("-")[0]))


def _run_stream(llm, prompts: list[str], sp, concurrency: int) -> tuple[list[Any], list[float], float]:
    """Keep `concurrency` requests in flight, submitting the next one as soon as
    one finishes: an offline job at batch size `concurrency` under vLLM's
    continuous batching. Returns outputs in submission order, each request's
    latency (finish - its own submission) and the wall time."""
    from time import perf_counter

    eng = llm.llm_engine
    ids: list[str] = []
    submitted: list[float] = []
    t0 = perf_counter()

    def submit() -> None:
        submitted.append(perf_counter())
        ids.extend(llm.enqueue([prompts[len(submitted) - 1]], sp, use_tqdm=False))

    for _ in range(min(concurrency, len(prompts))):
        submit()
    done: dict[str, tuple[Any, float]] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = (o, perf_counter())
                if len(submitted) < len(prompts):
                    submit()
    wall = perf_counter() - t0
    ordered = _in_submission_order(ids, done)
    return [o for o, _ in ordered], [t - s for (_, t), s in zip(ordered, submitted)], wall


def run_cell(llm, prompts: list[str], batch: int, spec: dict[str, Any], is_flex: bool) -> tuple[dict, list]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=spec["ignore_eos"])
    continuous = spec.get("admission", "group") == "continuous"
    n = cell_requests(batch, spec["min_requests"], continuous)
    idx = [i % len(prompts) for i in range(n)]
    # warm-up at this batch size (also lets the flex policy see this batch bucket), excluded
    if spec["warmup_tokens"] > 0:
        warm = [prompts[(len(prompts) - 1 - i) % len(prompts)] for i in range(batch)]
        _run_group(llm, warm, SamplingParams(temperature=0.0, max_tokens=spec["warmup_tokens"],
                                             ignore_eos=spec["ignore_eos"]))
    m0 = _metrics_snapshot(llm)
    p0 = _policy(llm) if is_flex else None
    lat, ttft, toks, wall, ptoks = [], [], [], 0.0, 0
    runs = ([_run_stream(llm, [prompts[i] for i in idx], sp, batch)] if continuous else
            (_run_group(llm, [prompts[i] for i in idx[g : g + batch]], sp) for g in range(0, n, batch)))
    for outs, done_at, w in runs:
        wall += w
        lat += done_at
        for o in outs:
            toks.append(list(o.outputs[0].token_ids))
            ptoks += len(o.prompt_token_ids or [])
            ft = getattr(getattr(o, "metrics", None), "first_token_latency", None)
            if ft:
                ttft.append(ft)
    m1 = _metrics_snapshot(llm)
    p1 = _policy(llm) if is_flex else None
    out_tokens = sum(map(len, toks))
    per_pos = _delta(m0, m1, "vllm:spec_decode_num_accepted_tokens_per_pos")
    rec: dict[str, Any] = {
        "status": "ok",
        "requests": n,
        "groups": n // batch,
        "prompt_tokens": ptoks,
        "output_tokens": out_tokens,
        "mean_output_len": out_tokens / n,
        "wall_s": wall,
        "output_tok_s": out_tokens / wall if wall > 0 else None,
        "latency_s": report.summary_stats(lat),
        "ttft_s": report.summary_stats(ttft) if ttft else None,
        "preemptions": _delta(m0, m1, "vllm:num_preemptions"),
        "spec": report.spec_summary(
            _delta(m0, m1, "vllm:spec_decode_num_drafts"),
            _delta(m0, m1, "vllm:spec_decode_num_draft_tokens"),
            _delta(m0, m1, "vllm:spec_decode_num_accepted_tokens"),
            per_pos if isinstance(per_pos, list) else None,
        ),
    }
    if is_flex:
        if p0 and p1 and "chosen" in p0 and "chosen" in p1:
            d = {k: p1["chosen"].get(k, 0) - p0["chosen"].get(k, 0) for k in p1["chosen"]}
            rec["policy"] = {
                "steps": {a: d.get(a, 0) for a in report.POLICY_ARMS},
                "draft_share": (d.get("parallel", 0) + d.get("sequential", 0)) / max(1, sum(d.values())),
                "note": "steps per arm the flex policy chose: parallel (groups in the verify forward), "
                        "sequential (post-verify draft pass), off (plain decode step)",
                "state": p1.get("summary"),  # plain step ms per bucket, cost corrections, acceptance
            }
        else:
            rec["policy"] = {"note": "policy state not readable from the engine", "raw": p1}
    return rec, toks


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    method, inbox = spec["method"], Path(spec["inbox"])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    _say(f"{method}: starting engine")
    t0 = time.perf_counter()
    try:
        from vllm import LLM

        llm = LLM(model=spec["model"], **spec["engine_kwargs"])
    except BaseException as e:  # noqa: BLE001 - any start-up failure makes the method unavailable
        _emit(inbox, {"method": method, "status": f"unavailable: {type(e).__name__}: {e}"})
        _say(f"{method}: unavailable: {type(e).__name__}: {str(e)[:300]}")
        return 0
    try:
        vc = llm.llm_engine.vllm_config
        sc, async_sched = vc.speculative_config, bool(vc.scheduler_config.async_scheduling)
    except Exception:  # noqa: BLE001
        sc, async_sched = None, None
    # recorded, as a difference between methods moves the ratios: vLLM 0.32 turns async scheduling
    # off for custom_class/ngram/suffix methods on CUDA, and for every engine on CPU
    _emit(inbox, {"method": method, "status": "ok", "engine_start_s": time.perf_counter() - t0,
                  "resolved_speculative_config": None if sc is None else str(sc), "async_scheduling": async_sched})
    _say(f"{method}: engine up in {time.perf_counter() - t0:.0f} s")
    from vllm import SamplingParams

    _run_group(llm, prompts[:2], SamplingParams(temperature=0.0, max_tokens=8))  # first-call costs, excluded
    is_flex = method.startswith("flexdraft-")
    out_dir = Path(spec["out_dir"])
    (out_dir / "outputs").mkdir(parents=True, exist_ok=True)
    rc = 0
    for b in spec["batches"]:
        n = cell_requests(b, spec["min_requests"], spec.get("admission", "group") == "continuous")
        _say(f"{method}: batch {b}: {n} requests ...")
        try:
            rec, toks = run_cell(llm, prompts, b, spec, is_flex)
        except Exception as e:  # noqa: BLE001 - record and stop this method; the sweep goes on
            import traceback

            traceback.print_exc()
            _emit(inbox, {"method": method, "x": b, "status": f"failed: {type(e).__name__}: {e}", "run": spec["run"]})
            _say(f"{method}: batch {b}: failed: {type(e).__name__}: {e}")
            rc = 1
            break
        rel = f"outputs/{method}_b{b}.json"
        (out_dir / rel).write_text(json.dumps(toks))
        rec.update(method=method, x=b, run=spec["run"], outputs_file=rel)
        _emit(inbox, rec)
        acc = (rec.get("spec") or {}).get("mean_accepted_length")
        _say(f"{method}: batch {b}: {rec['output_tok_s']:.1f} tok/s, latency mean {rec['latency_s']['mean']:.2f} s"
             + (f", accepted length {acc:.2f}" if acc else "")
             + (f", policy steps parallel/sequential/off {report.policy_steps(rec['policy'])}"
                if rec.get("policy") else ""))
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass
    return rc


# ---- the parent: plan, spawn workers, merge, report ----------------------------------------
def _engine_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment every worker gets (identical across methods): the same
    OpenMP/allocator preloads run.sh uses, if present."""
    env = dict(os.environ)
    env["FLEXDRAFT_KV_GIB"] = str(args.kv_gib)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.engine_process == "separate" else "0"
    env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if args.preload:
        pre = [str(p) for p in (Path(sys.prefix) / "lib" / "libiomp5.so",
                                Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")) if p.is_file()]
        have = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
        env["LD_PRELOAD"] = ":".join(dict.fromkeys(have + pre))
        if not env["LD_PRELOAD"]:
            env.pop("LD_PRELOAD")
    return env


def select_prompts(args: argparse.Namespace) -> tuple[list[str], list[str], int]:
    """(raw prompts, chat-templated prompts, number dropped): the first
    --num-prompts of the set whose templated length leaves room for max_tokens."""
    from transformers import AutoTokenizer

    from flexdraft_vllm.prompts import apply_chat_template, load_prompts

    raw = load_prompts(args.prompts, None)
    chat = apply_chat_template(str(args.model), raw)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    room = args.max_model_len - args.max_tokens - 16
    keep = [(r, c) for r, c in zip(raw, chat) if len(tok(c).input_ids) <= room][: args.num_prompts]
    return [r for r, _ in keep], [c for _, c in keep], sum(1 for c in chat if len(tok(c).input_ids) > room)


def _run_worker(method: str, spec: dict[str, Any], out_dir: Path, env: dict[str, str], cmd_prefix: list[str]) -> int:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / f".worker-{method}.json"
    spec_path.write_text(json.dumps(spec))
    wenv = dict(env)
    extra = spec.get("extra_pythonpath")
    if extra:
        wenv["PYTHONPATH"] = os.pathsep.join([extra, *filter(None, [wenv.get("PYTHONPATH")])])
    cmd = [*cmd_prefix, sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    with open(logs / f"{method}.log", "a") as log:
        log.write(f"\n===== {report.now()} {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=wenv, text=True,
                                bufsize=1, cwd=str(report.REPO))
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith(PROGRESS):
                    print(f"[{time.strftime('%H:%M:%S')}] {line[len(PROGRESS):].rstrip()}", flush=True)
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            spec_path.unlink(missing_ok=True)


def _finish_method(results: dict[str, Any], method: str, batches: list[int], rc: int, log_path: Path, run: int) -> None:
    """After a worker: specific start-up errors from the log; cells it never got to."""
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    # keep only this invocation's part of the log
    log_text = log_text.rsplit("\n===== ", 1)[-1]
    st = results["methods"].get(method, {}).get("status", "")
    if st.startswith("unavailable:"):
        why = report.root_cause(log_text, st.removeprefix("unavailable: "))
        results["methods"][method]["status"] = report.with_hint(method, "unavailable: " + why)
        return
    missing = report.pending(results, method, batches)
    if missing and rc != 0:
        why = report.root_cause(log_text, f"worker exited with status {rc}")
        if method not in results["methods"] or not st:
            results["methods"].setdefault(method, {})["status"] = f"failed: {why}"
        for b in missing:
            if str(b) not in results["cells"].get(method, {}):
                report.merge_record(results, {"method": method, "x": b, "status": f"not run: {why}", "run": run})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="offline", help="results folder name under --results-root")
    ap.add_argument("--results-root", type=Path, default=report.RESULTS_ROOT)
    ap.add_argument("--methods", type=parse_methods, default=DEFAULT_METHODS,
                    help=f"default {','.join(DEFAULT_METHODS)}; also {','.join(report.DIAGNOSTIC_METHODS)}")
    ap.add_argument("--batches", type=parse_int_list, default=DEFAULT_BATCHES, help="default 1,2,4,8,16,32,64")
    ap.add_argument("--model", type=Path, default=None, help="target model folder (default: the prepared SmolLM2)")
    ap.add_argument("--prompts", default="mixed", help="humaneval | chat | mixed | path to a JSONL of {\"prompt\": ...}")
    ap.add_argument("--num-prompts", type=int, default=64, help="distinct prompts (cells cycle through them)")
    ap.add_argument("--min-requests", type=int, default=16, help="requests per cell at least (whole groups of batch)")
    ap.add_argument("--admission", choices=("continuous", "group"), default="continuous",
                    help="'continuous' (default): `batch` requests in flight, the next submitted as soon as one "
                         "finishes (an offline job under vLLM's continuous batching; 2 x batch requests at least); "
                         "'group': `batch` requests at a time, the next group after the whole group finished (each "
                         "group waits for its slowest request, which speculative methods make slower than plain)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=16, help="max_tokens of the excluded warm-up group per cell")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="every request generates exactly max_tokens, so the batch stays full (default on)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="engine max_num_seqs for every method (default max(64, largest batch), fixed so that "
                         "a resumed run with other batch sizes keeps the same engine settings)")
    ap.add_argument("--kv-gib", type=float, default=2.0, help="KV cache size on CPU (FLEXDRAFT_KV_GIB)")
    ap.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                    help="vLLM prefix caching for every method (default off: each cell pays its own prefill)")
    ap.add_argument("--ngram-config", type=json.loads, default=None, help=f"default {json.dumps(NGRAM_DEFAULT)}")
    ap.add_argument("--suffix-config", type=json.loads, default=None, help=f"default {json.dumps(SUFFIX_DEFAULT)}")
    ap.add_argument("--suffix-pythonpath", default=None,
                    help="folder holding arctic_inference, for the suffix worker only "
                         f"(default: {ARCTIC_OVERLAY} if it exists; make it with benchmarks/arctic_overlay.py)")
    ap.add_argument("--preload", action=argparse.BooleanOptionalAction, default=True,
                    help="LD_PRELOAD Intel OpenMP / tcmalloc for the workers, as run.sh does (default on)")
    ap.add_argument("--engine-process", choices=("separate", "same"), default="separate",
                    help="where each method's engine core runs: 'separate' (vLLM's default for LLM(...): its own "
                         "process, VLLM_ENABLE_V1_MULTIPROCESSING=1) or 'same' (in the worker's process, =0; on "
                         "CPU this also keeps the in-process executor, as `flexdraft-vllm serve` does)")
    ap.add_argument("--nice", type=int, default=0, help="run workers under `nice -n N`")
    ap.add_argument("--plain-bracket", action=argparse.BooleanOptionalAction, default=True,
                    help="run plain again after the other methods ('plain-again') and take ratios against the mean "
                         "of the two plain runs: the machine's drift over the sweep then biases no method toward "
                         "plain (default on)")
    ap.add_argument("--fresh", action="store_true", help="discard stored cells of this --name and start over")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    from flexdraft_vllm.prepare import default_model_dir, is_prepared

    args.model = (args.model or default_model_dir()).resolve()
    if not is_prepared(args.model) and not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `./run.sh setup` (or python -m flexdraft_vllm.prepare)")
    args.batches_all = sorted(set(args.batches))
    args.max_num_seqs = args.max_num_seqs or max(64, *args.batches_all)
    out_dir = args.results_root / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / "results.json"

    _, prompts, dropped = select_prompts(args)
    if len(prompts) < args.num_prompts:
        print(f"note: {len(prompts)} prompts available (asked {args.num_prompts}; {dropped} too long dropped)")
    config = sweep_config(args, prompts)
    results, started_new = report.resume_or_new(res_path, "offline_sweep", config, args.fresh)
    if started_new:
        for p in (out_dir / "outputs").glob("*.json"):
            p.unlink()
    (out_dir / "prompts.json").write_text(json.dumps(prompts))
    for inbox in out_dir.glob(".inbox-*.jsonl"):  # left by an interrupted invocation
        report.merge_inbox(results, inbox)
        inbox.unlink()

    os.environ["FLEXDRAFT_KV_GIB"] = str(args.kv_gib)
    from flexdraft_vllm.engine_defaults import default_engine_kwargs

    base = default_engine_kwargs(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                 disable_log_stats=False, enable_prefix_caching=args.prefix_caching)
    env = _engine_env(args)
    machine = report.machine_info()
    run_idx = len(results["runs"])
    order = run_order(args.methods, args.plain_bracket)
    results["runs"].append({"index": run_idx, "started": report.now(), "command": shlex.join([sys.executable, *sys.argv]),
                            "machine": machine, "methods": order, "batches": args.batches_all,
                            "ld_preload": env.get("LD_PRELOAD")})
    report.save_results(res_path, results)
    print(f"offline sweep '{args.name}' -> {out_dir}")
    print(f"machine: {report.describe_machine(machine)}")
    warn = report.busy_warning(machine)
    if warn:
        print(warn)
    cmd_prefix = ["nice", "-n", str(args.nice)] if args.nice else []
    suffix_path = args.suffix_pythonpath or (str(ARCTIC_OVERLAY) if ARCTIC_OVERLAY.is_dir() else None)

    interrupted = False
    try:
        for i, method in enumerate(order, 1):
            todo = report.pending(results, method, args.batches_all)
            if not todo:
                print(f"[{i}/{len(order)}] {method}: all batch sizes done, skipped")
                continue
            print(f"[{i}/{len(order)}] {method}: batch sizes {todo}")
            try:
                kw = method_engine_kwargs(method, base, args.ngram_config, args.suffix_config)
            except Exception as e:  # noqa: BLE001
                report.merge_record(results, {"method": method, "status": f"unavailable: {type(e).__name__}: {e}"})
                report.save_results(res_path, results)
                continue
            results["methods"].setdefault(method, {})["engine"] = kw
            results["methods"][method]["status"] = ""
            inbox = out_dir / f".inbox-{method}.jsonl"
            spec = {"method": method, "model": str(args.model), "engine_kwargs": kw, "batches": todo,
                    "prompts_file": str(out_dir / "prompts.json"), "max_tokens": args.max_tokens,
                    "min_requests": args.min_requests, "warmup_tokens": args.warmup_tokens,
                    "admission": args.admission,
                    "ignore_eos": args.ignore_eos, "inbox": str(inbox), "out_dir": str(out_dir), "run": run_idx,
                    "extra_pythonpath": suffix_path if method in report.SUFFIX_METHODS else None}
            t0 = time.time()
            rc = -1
            try:
                rc = _run_worker(method, spec, out_dir, env, cmd_prefix)
            finally:
                report.merge_inbox(results, inbox)
                inbox.unlink(missing_ok=True)
                _finish_method(results, method, todo, rc, out_dir / "logs" / f"{method}.log", run_idx)
                lossless_check(results, out_dir)
                report.save_results(res_path, results)
                report.write_reports(results, out_dir)
            print(f"    {method}: {results['methods'][method].get('status') or 'done'} ({time.time() - t0:.0f} s)")
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: finished cells are saved; rerun the same command to resume")
    results["runs"][run_idx]["finished"] = report.now()
    report.save_results(res_path, results)
    paths = report.write_reports(results, out_dir)
    print()
    print((out_dir / "table.md").read_text())
    print("written:", ", ".join(str(p) for p in [res_path, *paths]))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
