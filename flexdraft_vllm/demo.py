"""The main job: offline generation through vLLM, FlexDraft against plain vLLM.

Runs the same prompts (HumanEval + chat) through plain vLLM and through vLLM
with FlexDraft, checks the greedy outputs are identical, and prints tokens/s
and the speedup. `./run.sh demo` calls this after install + model preparation.
"""

from __future__ import annotations

import argparse
import gc
import time

from flexdraft_vllm.engine_defaults import default_engine_kwargs
from flexdraft_vllm.prompts import load_prompts


def _run(model: str, prompts: list[str], max_tokens: int, spec: dict | None) -> tuple[list[list[int]], float]:
    from vllm import LLM, SamplingParams

    kw = default_engine_kwargs()
    if spec is not None:
        kw["speculative_config"] = spec
    llm = LLM(model=model, max_model_len=2048, **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=False)
    llm.generate(prompts[:1], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    toks = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    gc.collect()
    return toks, dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)

    from flexdraft_vllm.prompts import apply_chat_template

    prompts = apply_chat_template(args.model, load_prompts("mixed", args.num_prompts))
    base, t_base = _run(args.model, prompts, args.max_tokens, None)
    n = sum(map(len, base))
    print(f"\nplain vLLM : {n} tokens in {t_base:.2f} s = {n / t_base:.1f} tok/s (batch {len(prompts)})")
    spec = None
    try:
        from flexdraft_vllm.vllm_integration.speculative import flexdraft_speculative_config
    except ImportError:
        flexdraft_speculative_config = None
    if flexdraft_speculative_config is None:
        print("FlexDraft  : not available in this build yet (vLLM integration pending); plain vLLM only.")
        return
    spec = flexdraft_speculative_config(args.model)
    fd, t_fd = _run(args.model, prompts, args.max_tokens, spec)
    same = fd == base
    m = sum(map(len, fd))
    print(f"FlexDraft  : {m} tokens in {t_fd:.2f} s = {m / t_fd:.1f} tok/s")
    print(f"speedup    : {t_base / t_fd:.2f}x   greedy outputs identical: {same}")
    if not same:
        raise SystemExit("FlexDraft output differs from plain vLLM: this is a bug, please report it")


if __name__ == "__main__":
    main()
