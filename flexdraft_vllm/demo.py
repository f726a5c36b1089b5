"""The main job: offline generation through vLLM, FlexDraft against plain vLLM.

Runs the same prompts (HumanEval + chat) through plain vLLM and through vLLM
with FlexDraft (flex mode, with prompt lookup beside it as by default;
--prompt-lookup-max 0 for the mask block alone), at batch 1 (one request at a time, the latency
case) and with all prompts in one batch; checks the greedy outputs are
identical and prints tokens/s, the speedup and FlexDraft's mean accepted
length. `./run.sh demo` calls this after install + model preparation.
"""

from __future__ import annotations

import argparse
import os
import time

from flexdraft_vllm.engine_defaults import default_engine_kwargs
from flexdraft_vllm.prompts import apply_chat_template, load_prompts

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")


def _run(model: str, prompts: list[str], max_tokens: int, flexdraft: dict | None, batches: list[int]) -> dict:
    from vllm import LLM, SamplingParams

    from flexdraft_vllm.vllm_integration.speculative import flexdraft_engine_kwargs

    kw = default_engine_kwargs(disable_log_stats=False)
    if flexdraft is not None:
        kw.update(flexdraft_engine_kwargs(**flexdraft))
    llm = LLM(model=model, max_model_len=2048, **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    try:
        llm.generate(prompts[:2], sp, use_tqdm=False)  # warm-up
        res = {}
        for b in batches:
            t0 = time.perf_counter()
            outs = []
            for i in range(0, len(prompts), b):
                outs += llm.generate(prompts[i : i + b], sp, use_tqdm=False)
            res[b] = ([list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t0)
        counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
        drafts = counters.get("vllm:spec_decode_num_drafts") or 0
        accepted = counters.get("vllm:spec_decode_num_accepted_tokens") or 0
        res["mean_accepted_length"] = 1 + accepted / drafts if drafts else None
        return res
    finally:
        llm.llm_engine.engine_core.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--mode", default="flex", choices=["flex", "sequential"])
    ap.add_argument("--prompt-lookup-max", type=int, default=None,
                    help="prompt lookup beside FlexDraft: longest n-gram matched (default: FlexDraft's, 4; 0: off)")
    args = ap.parse_args(argv)

    prompts = apply_chat_template(args.model, load_prompts("mixed", args.num_prompts))
    batches = [1, len(prompts)]
    print(f"[demo] plain vLLM, {len(prompts)} prompts, batch {batches} ...", flush=True)
    base = _run(args.model, prompts, args.max_tokens, None, batches)
    opts = {"mode": args.mode}
    if args.prompt_lookup_max is not None:
        opts["prompt_lookup_max"] = args.prompt_lookup_max
    lookup = "no prompt lookup" if args.prompt_lookup_max == 0 else "prompt lookup beside it"
    print(f"[demo] vLLM + FlexDraft ({args.mode}, {lookup}) ...", flush=True)
    fd = _run(args.model, prompts, args.max_tokens, opts, batches)
    ok = True
    print(f"\n{'batch':>5} | {'plain tok/s':>11} | {'FlexDraft tok/s':>15} | {'speedup':>7} | identical")
    for b in batches:
        (bt, bs), (ft, fs) = base[b], fd[b]
        n = sum(map(len, bt))
        same = bt == ft
        ok &= same
        print(f"{b:>5} | {n / bs:>11.1f} | {sum(map(len, ft)) / fs:>15.1f} | {bs / fs:>6.2f}x | {same}")
    mal = fd["mean_accepted_length"]
    print(f"FlexDraft mean accepted length (tokens per target forward, bonus included): "
          f"{mal:.2f}" if mal else "FlexDraft proposed no drafts")
    if not ok:
        raise SystemExit("FlexDraft output differs from plain vLLM: this is a bug, please report it")


if __name__ == "__main__":
    main()
