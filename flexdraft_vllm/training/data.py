"""Self-distillation data: the target writes the prompts and answers them.

Stage 1 (prompts): the target samples user turns from its own chat template
  ("<|im_start|>user\\n" + a seed prefix), so no external data is needed.
  A JSONL of {"prompt": ...} lines can be given instead / in addition.
Stage 2 (responses): the target answers every prompt greedily through vLLM.
  Greedy answers are exactly what greedy FlexDraft must predict.
Stage 3 (deep K/V): one frozen forward per sequence; the post-RoPE K/V of the
  deep layers are stored (fp16). Training then never runs the target again:
  mask rows only attend to these frozen real-token K/V.

Every stage writes its output file atomically and is skipped when the file
exists, so an interrupted run resumes at the stage it was in; stage 3 writes
shards and resumes at the first missing shard.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from tqdm import tqdm

# Seed prefixes steer the synthesised prompts toward the traffic we serve:
# everyday chat and code. HumanEval and the built-in chat set stay held out.
SEED_PREFIXES = [
    "", "", "", "What", "How do I", "Explain", "Write a Python function", "Write a Python function that",
    "Write a short", "Can you", "Give me", "Why", "Write a function in Python to", "Implement",
    "def ", "Fix this code:", "Describe", "List", "Tell me about", "Summarize",
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def _llm(model_dir: str, max_model_len: int):
    from vllm import LLM

    from flexdraft_vllm.engine_defaults import default_engine_kwargs

    return LLM(model=model_dir, max_model_len=max_model_len, max_num_seqs=128, **default_engine_kwargs())


def synthesize_prompts(llm, n: int, seed: int) -> list[str]:
    from vllm import SamplingParams

    rng = random.Random(seed)
    prefixes = [rng.choice(SEED_PREFIXES) for _ in range(n)]
    texts = [f"<|im_start|>user\n{p}" for p in prefixes]
    sp = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=64, stop=["<|im_end|>", "<|im_start|>"], seed=seed + i)
          for i in range(n)]
    outs = llm.generate(texts, sp)
    prompts = []
    for pre, o in zip(prefixes, outs):
        body = (pre + o.outputs[0].text).strip()
        if len(body) >= 8:  # a prompt cut at 64 tokens is still a prompt
            prompts.append(body)
    return prompts


def build_dataset(
    model_dir: str,
    out_dir: str | Path,
    num_prompts: int = 600,
    max_new_tokens: int = 256,
    prompts_jsonl: str | None = None,
    seed: int = 0,
) -> Path:
    """Stages 1-2. Returns the path of sequences.jsonl (prompt_ids, response_ids)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq_file = out / "sequences.jsonl"
    if seq_file.exists():
        print(f"[data] {seq_file} exists, skipping generation", flush=True)
        return seq_file
    llm = None
    prompt_file = out / "prompts.jsonl"
    if not prompt_file.exists():
        prompts: list[str] = []
        if prompts_jsonl:
            from flexdraft_vllm.prompts import jsonl_prompts

            prompts += jsonl_prompts(prompts_jsonl)
        if len(prompts) < num_prompts:
            print(f"[data] 1/2 the target synthesises {num_prompts - len(prompts)} prompts ...", flush=True)
            llm = _llm(model_dir, 2048)
            prompts += synthesize_prompts(llm, int((num_prompts - len(prompts)) * 1.3), seed)
        prompts = list(dict.fromkeys(prompts))[:num_prompts]
        _write_jsonl(prompt_file, [{"prompt": p} for p in prompts])
    prompts = [r["prompt"] for r in _read_jsonl(prompt_file)]
    print(f"[data] 2/2 the target answers {len(prompts)} prompts greedily (max {max_new_tokens} tokens) ...", flush=True)
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    llm = llm or _llm(model_dir, 2048)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    outs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    rows = []
    for p, o in zip(prompts, outs):
        pid = list(o.prompt_token_ids)
        rid = list(o.outputs[0].token_ids)
        if len(rid) >= 4:
            rows.append({"prompt_ids": pid, "response_ids": rid})
    _write_jsonl(seq_file, rows)
    n_tok = sum(len(r["response_ids"]) for r in rows)
    print(f"[data] {len(rows)} sequences, {n_tok} response tokens -> {seq_file}", flush=True)
    del llm
    return seq_file


@torch.no_grad()
def deep_kv_for(target, ids: list[int], deep_layers: range) -> torch.Tensor:
    """[n_deep, 2, T, Hkv, D] post-RoPE K/V of the real tokens in the deep layers.

    Computed with the reference forward (same code the decoder uses), so the
    K/V the masks see in training are exactly those they see at inference.
    """
    from flexdraft_vllm.reference.forward import RequestCache, step_forward

    out = step_forward(target, None, [RequestCache()], [torch.tensor(ids)])
    return torch.stack([torch.stack([out.new_k[0][l], out.new_v[0][l]]) for l in deep_layers])


def build_kv_shards(target, seq_file: Path, deep_layers: range, shard_size: int = 32, max_len: int = 512) -> list[Path]:
    """Stage 3: shards of {"ids", "prompt_len", "kv"} lists; resumes per shard."""
    rows = _read_jsonl(seq_file)
    shard_dir = seq_file.parent / f"kv_s{deep_layers.start}"
    shard_dir.mkdir(exist_ok=True)
    paths = []
    todo = [(i, rows[i: i + shard_size]) for i in range(0, len(rows), shard_size)]
    bar = tqdm(total=len(rows), desc="[data] deep K/V", unit="seq")
    for start, chunk in todo:
        p = shard_dir / f"shard_{start:06d}.pt"
        paths.append(p)
        if p.exists():
            bar.update(len(chunk))
            continue
        items = []
        for r in chunk:
            ids = (r["prompt_ids"] + r["response_ids"])[:max_len]
            kv = deep_kv_for(target, ids, deep_layers).to(torch.float16)
            items.append({"ids": torch.tensor(ids), "prompt_len": len(r["prompt_ids"]), "kv": kv})
            bar.update(1)
        torch.save(items, p.with_suffix(".tmp"))
        os.replace(p.with_suffix(".tmp"), p)
    bar.close()
    return paths
