"""benchmarks/offline_sweep.py and serve_bench.py: the parts that need no engine
(argument parsing, request plans, engine arguments, lossless check, resume after
a failed worker, vllm bench serve flags and result parsing, server shutdown)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import offline_sweep  # noqa: E402
import report  # noqa: E402
import serve_bench  # noqa: E402


def test_parse_lists_and_methods():
    assert offline_sweep.parse_int_list("1,2, 4") == [1, 2, 4]
    with pytest.raises(argparse.ArgumentTypeError):
        offline_sweep.parse_int_list("0,2")
    # baseline first, duplicates dropped, order fixed
    assert offline_sweep.parse_methods("flexdraft-flex,plain,ngram,plain") == ["plain", "ngram", "flexdraft-flex"]
    with pytest.raises(argparse.ArgumentTypeError):
        offline_sweep.parse_methods("plain,eagle")


def test_parser_defaults_cover_the_issue():
    a = offline_sweep.build_parser().parse_args([])
    assert a.batches == [1, 2, 4, 8, 16, 32, 64]
    assert a.methods == ["plain", "ngram", "suffix", "suffix-nocache", "flexdraft-parallel", "flexdraft-sequential",
                         "flexdraft-flex", "flexdraft-lookup"]
    assert a.ignore_eos and not a.prefix_caching and a.prompts == "mixed" and a.admission == "continuous"


def test_plain_runs_again_last_when_something_else_runs():
    ms = ["plain", "ngram", "flexdraft-flex"]
    assert offline_sweep.run_order(ms, bracket=True) == [*ms, "plain-again"]
    assert offline_sweep.run_order(ms, bracket=False) == ms
    assert offline_sweep.run_order(["plain"], bracket=True) == ["plain"]  # nothing to bracket
    assert offline_sweep.run_order(["flexdraft-flex"], bracket=True) == ["flexdraft-flex"]
    assert offline_sweep.build_parser().parse_args([]).plain_bracket
    base = {"dtype": "float32"}
    assert offline_sweep.method_engine_kwargs("plain-again", base) == offline_sweep.method_engine_kwargs("plain", base)
    with pytest.raises(argparse.ArgumentTypeError):  # the bracket's second run is not chosen by hand
        offline_sweep.parse_methods("plain-again")


@pytest.mark.parametrize("batch,minimum,want", [(1, 16, 16), (4, 16, 16), (3, 16, 18), (32, 16, 32), (64, 16, 64),
                                                (2, 1, 2)])
def test_cell_requests_are_whole_groups(batch, minimum, want):
    n = offline_sweep.cell_requests(batch, minimum)
    assert n == want and n % batch == 0 and n >= batch and n >= minimum


@pytest.mark.parametrize("batch,minimum,want", [(1, 16, 16), (8, 16, 16), (16, 16, 32), (64, 16, 128), (3, 16, 18)])
def test_continuous_cells_keep_the_batch_full_twice_over(batch, minimum, want):
    assert offline_sweep.cell_requests(batch, minimum, continuous=True) == want


def test_method_engine_kwargs_share_the_base():
    base = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 64}
    plain = offline_sweep.method_engine_kwargs("plain", base)
    assert plain == base and plain is not base
    ng = offline_sweep.method_engine_kwargs("ngram", base)
    assert ng["speculative_config"]["method"] == "ngram" and ng["speculative_config"]["prompt_lookup_max"] == 4
    assert offline_sweep.method_engine_kwargs("ngram", base, ngram={"method": "ngram", "num_speculative_tokens": 7}
                                              )["speculative_config"]["num_speculative_tokens"] == 7
    assert offline_sweep.method_engine_kwargs("suffix", base)["speculative_config"] == {"method": "suffix"}
    # the same suffix settings, without the tree of earlier requests (no replays of reused prompts)
    assert offline_sweep.method_engine_kwargs("suffix-nocache", base, suffix={"method": "suffix", "x": 1}
                                              )["speculative_config"] == {
        "method": "suffix", "x": 1, "suffix_decoding_max_cached_requests": 0}
    for mode in ("parallel", "sequential", "flex"):
        kw = offline_sweep.method_engine_kwargs(f"flexdraft-{mode}", base)
        assert kw["speculative_config"]["model"] == "flexdraft_vllm.FlexDraft"
        assert kw["additional_config"]["flexdraft"]["mode"] == mode
        assert {k: kw[k] for k in base} == base
    assert "speculative_config" not in base
    with pytest.raises(ValueError):
        offline_sweep.method_engine_kwargs("eagle", base)


def _results_with_outputs(tmp_path, outputs: dict[tuple[str, int], list]):
    r = report.new_results("offline_sweep", {})
    (tmp_path / "outputs").mkdir()
    for (m, b), toks in outputs.items():
        rel = f"outputs/{m}_b{b}.json"
        (tmp_path / rel).write_text(json.dumps(toks))
        report.merge_record(r, {"method": m, "x": b, "status": "ok", "outputs_file": rel})
    return r


def test_lossless_check(tmp_path):
    a, b, c = [1, 2, 3], [4, 5], [6]
    r = _results_with_outputs(tmp_path, {
        ("plain", 1): [a, b, c], ("plain", 2): [a, b, [7]],
        ("ngram", 1): [a, b, c], ("ngram", 2): [a, [4, 9], [7]],
        ("flexdraft-flex", 4): [a],
    })
    offline_sweep.lossless_check(r, tmp_path)
    assert r["cells"]["ngram"]["1"]["lossless"] == {"compared": 3, "mismatches": 0, "first_mismatch": None}
    assert r["cells"]["ngram"]["2"]["lossless"] == {"compared": 3, "mismatches": 1, "first_mismatch": 1}
    assert r["cells"]["flexdraft-flex"]["4"]["lossless"] == {"note": "no plain reference"}
    # batching alone moved plain's output for request 2: recorded for context
    assert r["cells"]["plain"]["2"]["vs_plain_smallest_batch"]["mismatches"] == 1
    assert "lossless" not in r["cells"]["plain"]["1"]


def test_finish_method_marks_unrun_cells_and_finds_the_reason(tmp_path):
    log = tmp_path / "m.log"
    log.write_text("old run\n===== now\nValueError: stale\n===== later\n"
                   "(EngineCore pid=1) ERROR 11-23 11:00:05 [core.py:7] flexdraft_vllm.config.FlexDraftConfigError: mode 'parallel' not in vLLM\n"
                   "RuntimeError: Engine core initialization failed. See root cause above.\n")
    r = report.new_results("offline_sweep", {})
    report.merge_record(r, {"method": "flexdraft-parallel", "status": "unavailable: RuntimeError: Engine core "
                                                                       "initialization failed. See root cause above."})
    offline_sweep._finish_method(r, "flexdraft-parallel", [1, 2], 0, log, 0)
    assert r["methods"]["flexdraft-parallel"]["status"] == \
        "unavailable: FlexDraftConfigError: mode 'parallel' not in vLLM"

    # a worker that died after batch 1 (no record for batch 2): batch 2 is 'not run' and stays pending
    log.write_text("===== x\nsegfault, no python error here\n")
    report.merge_record(r, {"method": "plain", "status": "ok"})
    report.merge_record(r, {"method": "plain", "x": 1, "status": "ok", "output_tok_s": 10.0})
    offline_sweep._finish_method(r, "plain", [1, 2], -11, log, 0)
    assert r["cells"]["plain"]["2"]["status"] == "not run: worker exited with status -11"
    assert report.pending(r, "plain", [1, 2]) == [2]


def test_engine_env_is_identical_for_every_method():
    a = argparse.Namespace(kv_gib=2.0, preload=False, engine_process="separate")
    env = offline_sweep._engine_env(a)
    assert env["FLEXDRAFT_KV_GIB"] == "2.0" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    a.engine_process = "same"  # set, not defaulted: an inherited VLLM_ENABLE_V1_MULTIPROCESSING must not win
    assert offline_sweep._engine_env(a)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    for script in (offline_sweep, serve_bench):
        assert script.build_parser().parse_args([]).engine_process == "separate"


# ---- serve_bench -----------------------------------------------------------------------------
def test_engine_cli_args():
    args = serve_bench.engine_cli_args({"dtype": "float32", "enforce_eager": True, "enable_prefix_caching": False,
                                        "kv_cache_memory_bytes": 1024, "seed": 0, "max_loras": None,
                                        "speculative_config": {"model": "flexdraft_vllm.FlexDraft"}})
    assert args == ["--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching",
                    "--kv-cache-memory-bytes", "1024", "--seed", "0",
                    "--speculative-config", '{"model": "flexdraft_vllm.FlexDraft"}']


def test_sharegpt_dataset_shape():
    d = serve_bench.sharegpt_dataset(["hello there", "write code"])
    assert len(d) == 2 and d[1]["conversations"][0] == {"from": "human", "value": "write code"}
    assert all(len(e["conversations"]) >= 2 for e in d)  # vLLM drops entries with fewer turns


def test_level_requests():
    assert serve_bench.level_requests(1, 16, 2) == 16
    assert serve_bench.level_requests(64, 16, 2) == 128


def test_interleaved_schedule_runs_each_level_for_every_method_back_to_back():
    ms, levels = ["plain", "flexdraft-flex", "flexdraft-lookup"], [1, 2, 4, 8]
    sched = serve_bench.run_schedule(ms, levels, "interleaved")
    assert sorted(sched) == sorted((c, m) for m in ms for c in levels)  # every cell once
    assert [c for c, _ in sched] == [c for c in levels for _ in ms]  # level by level
    firsts = [sched[i * len(ms)][1] for i in range(len(levels))]
    assert firsts == ["plain", "flexdraft-lookup", "plain", "flexdraft-lookup"]  # no method always first
    assert serve_bench.server_groups(ms, "interleaved") == [ms]


def test_method_order_runs_one_server_at_a_time():
    ms = ["plain", "flexdraft-flex"]
    assert serve_bench.run_schedule(ms, [1, 2], "method") == [(1, "plain"), (2, "plain"),
                                                               (1, "flexdraft-flex"), (2, "flexdraft-flex")]
    assert serve_bench.server_groups(ms, "method") == [["plain"], ["flexdraft-flex"]]
    assert serve_bench.server_groups([], "interleaved") == []


def test_servers_fit():
    assert serve_bench.servers_fit(4, 2.0, 23.5)  # 20 GiB of 21.2 (measured: 19.8 GiB used)
    assert not serve_bench.servers_fit(5, 2.0, 23.5)
    assert serve_bench.servers_fit(1, 64.0, 8.0)  # one server is the user's own choice
    assert not serve_bench.servers_fit(2, 2.0, None)


def test_bench_command_flags(tmp_path):
    cmd = serve_bench.bench_command(base_url="http://127.0.0.1:9", model="/m", dataset=tmp_path / "d.jsonl",
                                    max_tokens=16, num_prompts=4, concurrency=2, result_dir=tmp_path,
                                    result_file="r.json", ignore_eos=True, warmups=2)
    s = " ".join(cmd)
    assert cmd[1].endswith("vllm_cli.py") and cmd[2:4] == ["bench", "serve"]
    for part in ("--dataset-name sharegpt", "--backend openai-chat", "--endpoint /v1/chat/completions",
                 "--max-concurrency 2", "--num-prompts 4", "--sharegpt-output-len 16",
                 "--temperature 0", "--save-result", "--ignore-eos", "--request-rate inf", "--disable-shuffle"):
        assert part in s


def test_parse_bench_result_keeps_summaries_not_lists():
    raw = {"duration": 10.0, "completed": 4, "failed": 0, "output_throughput": 25.0, "request_throughput": 0.4,
           "total_token_throughput": 80.0, "mean_ttft_ms": 100.0, "p99_ttft_ms": 200.0, "median_tpot_ms": 40.0,
           "mean_itl_ms": 41.0, "ttfts": [0.1] * 4, "itls": [[0.04]] * 4, "generated_texts": ["x"] * 4,
           "spec_decode_acceptance_length": 2.5, "spec_decode_per_position_acceptance_rates": [0.9, 0.6],
           "date": "20261123"}
    p = serve_bench.parse_bench_result(raw)
    assert p["status"] == "ok" and p["output_throughput"] == 25.0 and p["p99_ttft_ms"] == 200.0
    assert p["spec_decode_per_position_acceptance_rates"] == [0.9, 0.6]
    assert "ttfts" not in p and "generated_texts" not in p and "date" not in p
    assert serve_bench.parse_bench_result({"completed": 0, "failed": 4})["status"].startswith("failed")


def _group_members(pgid: int) -> dict[int, str]:
    """pid -> state letter of the live (not zombie) processes in group pgid."""
    out = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            out[int(st.parent.name)] = fields[0]
    return out


def _live_members(pgid: int) -> list[int]:
    return list(_group_members(pgid))


def test_server_stop_ends_its_process_group(tmp_path):
    # a stand-in "server" with a child of its own, both in the group Server created
    cmd = [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c',"
                                 "'import time; time.sleep(120)']); time.sleep(120)"]
    s = serve_bench.Server(cmd, {}, tmp_path / "s.log", port=1).start()
    time.sleep(0.5)
    pgid = s.proc.pid
    t0 = time.time()
    s.stop()
    assert s.proc.poll() is not None and time.time() - t0 < 45
    assert _live_members(pgid) == []  # nothing left running in the group (zombies aside)
    s.stop()  # idempotent


def _states(pgid: int) -> set[str]:
    return set(_group_members(pgid).values())


def test_a_parked_server_is_stopped_and_answers_again_when_resumed(tmp_path):
    port = serve_bench.free_port()
    code = ("import http.server, subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers()\n"
            f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    s = serve_bench.Server([sys.executable, "-c", code], {}, tmp_path / "s.log", port=port).start()
    try:
        s.wait_ready(timeout=30)
        time.sleep(0.5)  # the child is up too
        s.pause()
        time.sleep(0.2)
        assert _states(s.proc.pid) == {"T"}  # every member of the group, the child too
        s.resume(timeout=30)
        assert "T" not in _states(s.proc.pid)
        s.pause()  # stop() works on a parked group
    finally:
        t0 = time.time()
        s.stop()
    assert s.proc.poll() is not None and time.time() - t0 < 45
    assert _live_members(s.proc.pid) == []


def test_server_that_dies_at_startup_is_reported(tmp_path):
    s = serve_bench.Server([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "s.log", port=1).start()
    with pytest.raises(serve_bench.ServerDied, match="status 3"):
        s.wait_ready(timeout=30)
    s.stop()


class _FakeLLM:
    """enqueue/step like vLLM's LLM + LLMEngine: request i needs 1 + i % 3 steps;
    ids are renamed inside the engine ("<counter>-<salt>"), as vLLM 0.32 does."""

    def __init__(self):
        self.llm_engine, self.running, self.counter, self.max_running = self, {}, 0, 0

    def enqueue(self, prompts, sp, use_tqdm=False):
        ids = []
        for p in prompts:
            self.running[f"{self.counter}-x"] = [p, 1 + int(p) % 3]
            ids.append(str(self.counter))
            self.counter += 1
        self.max_running = max(self.max_running, len(self.running))
        return ids

    def has_unfinished_requests(self):
        return bool(self.running)

    def step(self):
        from types import SimpleNamespace

        out = []
        for rid, r in list(self.running.items()):
            r[1] -= 1
            if r[1] == 0:
                del self.running[rid]
                out.append(SimpleNamespace(request_id=rid, finished=True, prompt=r[0]))
        return out


def test_continuous_admission_keeps_the_batch_full_and_the_order():
    llm = _FakeLLM()
    prompts = [str(i) for i in range(10)]
    outs, lat, wall = offline_sweep._run_stream(llm, prompts, None, 4)
    assert [o.prompt for o in outs] == prompts  # submission order, though they finish out of order
    assert llm.max_running == 4 and llm.counter == 10
    assert len(lat) == 10 and all(0 <= t <= wall for t in lat)
