"""Self-distillation data: the target writes the prompts and answers them.

Stage 1 (prompts): the target samples user turns from its own chat template
  ("<|im_start|>user\\n" + a seed prefix), so no external data is needed.
  A JSONL of {"prompt": ...} lines can be given instead / in addition.
Stage 2 (responses): the target answers every prompt greedily through vLLM.
  Greedy answers are exactly what greedy FlexDraft must predict.
Stage 3 (deep K/V): one frozen forward per sequence; the post-RoPE K/V of the
  deep layers are stored (fp16). Training then never runs the target again:
  mask rows only attend to these frozen real-token K/V.

Every stage resumes: prompts.jsonl is written atomically; stage 2 appends
answers per chunk of prompts and records its progress; stage 3 writes shards
and resumes at the first missing one. Raising num_prompts grows the dataset
in place: only the new prompts are synthesised, answered and encoded.
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
    "Complete this Python function. Reply with code only.\n\ndef ", "Complete this function:\n\ndef ",
]
SHARD_SIZE = 32  # sequences per K/V shard (stage 3 resumes per shard)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _progress_file(seq_file: Path) -> Path:
    """Stage 2's progress marker beside sequences.jsonl (see answer_prompts)."""
    return seq_file.with_suffix(".progress")


def _write_progress(seq_file: Path, prompts: int, rows: int) -> None:
    mark = _progress_file(seq_file)
    tmp = mark.with_name(mark.name + ".tmp")  # not "sequences.tmp": _write_jsonl's temp for seq_file
    tmp.write_text(json.dumps({"prompts": prompts, "rows": rows}))
    os.replace(tmp, mark)


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _llm(model_dir: str, max_model_len: int):
    from vllm import LLM

    from flexdraft_vllm.engine_defaults import default_engine_kwargs

    # One engine in this process: keep the engine core in-process so that the
    # worker gets both cores (see engine_defaults; 437 vs 150 tok/s measured).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return LLM(model=model_dir, max_model_len=max_model_len, max_num_seqs=128, **default_engine_kwargs())


def synthesize_prompts(llm, first: int, n: int, seed: int) -> list[tuple[int, str]]:
    """Candidates first..first+n-1 as (index, prompt); bad ones (too short) dropped.

    Candidate j depends only on (seed, j): its seed prefix and its sampling
    seed, so a dataset grown in steps equals one made in a single run.
    """
    from vllm import SamplingParams

    idx = list(range(first, first + n))
    prefixes = [random.Random(seed * 1_000_003 + j).choice(SEED_PREFIXES) for j in idx]
    texts = [f"<|im_start|>user\n{p}" for p in prefixes]
    sp = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=64, stop=["<|im_end|>", "<|im_start|>"], seed=seed + j)
          for j in idx]
    outs = llm.generate(texts, sp)
    out = []
    for j, pre, o in zip(idx, prefixes, outs):
        body = (pre + o.outputs[0].text).strip()
        if len(body) >= 8:  # a prompt cut at 64 tokens is still a prompt
            out.append((j, body))
    return out


def extra_prompt_list(paths: str | list[str], limits: int | list[int] = 0) -> list[str]:
    """The extra prompts a config names: the first limits[i] (0 = all) distinct
    prompts of each JSONL in paths, in order, duplicates across files dropped.
    One path and one limit, or lists of equal length (a later round appends a
    file, so an earlier round's extras stay a prefix of its)."""
    from flexdraft_vllm.prompts import jsonl_prompts

    paths = [paths] if isinstance(paths, str) else list(paths)
    limits = [limits] * len(paths) if isinstance(limits, int) else list(limits)
    if len(limits) != len(paths):
        raise ValueError(f"extra_prompts {limits} must give one count per extra_prompts_jsonl file {paths}")
    want: list[str] = []
    for path, n in zip(paths, limits):
        want += list(dict.fromkeys(jsonl_prompts(path)))[: n or None]
    return list(dict.fromkeys(want))


def _extend_prompts(prompt_file: Path, num_prompts: int, prompts_jsonl: str | None, seed: int, get_llm,
                    extra_jsonl: str | list[str] | None = None, extra_limit: int | list[int] = 0) -> list[str]:
    """prompts.jsonl grows to num_prompts, then the extra prompts
    (extra_prompt_list(extra_jsonl, extra_limit)) follow; existing prompts keep their order.

    Rows are {"prompt", "j"}: j is the synthesis candidate index (-1 for a
    prompt read from prompts_jsonl), so growth continues after the last one;
    extra prompts carry "src": "extra". They come after the num_prompts base
    prompts, so a dataset made at once equals one grown in steps; the base
    cannot grow once extras are in (answers follow the file's order).
    """
    rows = _read_jsonl(prompt_file) if prompt_file.exists() else []
    n0 = len(rows)
    extra = [r for r in rows if r.get("src") == "extra"]
    rows = [r for r in rows if r.get("src") != "extra"]
    if extra and len(rows) < num_prompts:
        raise ValueError(f"{prompt_file}: num_prompts={num_prompts} would grow the base prompts ({len(rows)}) after "
                         f"{len(extra)} extra prompts were added; keep num_prompts or use a new work_dir")
    rows = _grow_base(rows, num_prompts, prompts_jsonl, seed, get_llm)
    named: list[str] = []  # the extra prompts this call names, in order
    if extra_jsonl:
        base = {r["prompt"] for r in rows}
        named = [q for q in extra_prompt_list(extra_jsonl, extra_limit) if q not in base]
    held = [r["prompt"] for r in extra]
    if held != named[: len(held)]:
        # Training reads every answered prompt of the work_dir: an earlier
        # round's config rerun after a later round grew the data would train on
        # prompts it does not name.
        raise ValueError(f"{prompt_file} holds {len(held)} extra prompts that this config does not name "
                         f"(extra_prompts_jsonl={extra_jsonl!r}, extra_prompts={extra_limit}, {len(named)} named); "
                         f"run the config that added them, or give this one a fresh work_dir")
    extra += [{"prompt": q, "j": -1, "src": "extra"} for q in named[len(held):]]
    rows += extra
    if len(rows) != n0:  # rows are only ever added
        _write_jsonl(prompt_file, rows)
    return [r["prompt"] for r in rows]


def _grow_base(rows: list[dict], num_prompts: int, prompts_jsonl: str | None, seed: int, get_llm) -> list[dict]:
    """The base prompts grown to num_prompts: prompts_jsonl's (only into an
    empty file), then synthesis candidates after the last one used."""
    if len(rows) >= num_prompts:
        return rows
    if not rows and prompts_jsonl:
        from flexdraft_vllm.prompts import jsonl_prompts

        rows = [{"prompt": q, "j": -1} for q in dict.fromkeys(jsonl_prompts(prompts_jsonl))][:num_prompts]
    seen = {r["prompt"] for r in rows}
    nxt = max((r.get("j", -1) for r in rows), default=-1) + 1
    if len(rows) < num_prompts:
        print(f"[data] 1/2 the target synthesises {num_prompts - len(rows)} prompts ...", flush=True)
    while len(rows) < num_prompts:
        n = int((num_prompts - len(rows)) * 1.3) + 8
        for j, q in synthesize_prompts(get_llm(), nxt, n, seed):
            if q not in seen and len(rows) < num_prompts:
                seen.add(q)
                rows.append({"prompt": q, "j": j})
        nxt += n
    return rows


def answer_prompts(prompts: list[str], seq_file: Path, answer, chunk: int = 256) -> list[dict]:
    """Stage 2, in chunks, appending to seq_file; resumes after the last finished chunk.

    `answer(list[str]) -> list[dict | None]` (None: too short to keep).
    Invariant: `<seq_file>.progress` = {"prompts": n answered, "rows": lines
    written for them}; a crash inside a chunk leaves extra lines that the next
    run cuts off; without .progress nothing counts as answered.
    """
    mark = _progress_file(seq_file)
    done = json.loads(mark.read_text()) if mark.exists() else {"prompts": 0, "rows": 0}
    rows = _read_jsonl(seq_file, limit=done["rows"]) if seq_file.exists() else []  # past it: maybe a torn line
    _write_jsonl(seq_file, rows)
    n0 = done["prompts"]
    if n0 < len(prompts):
        print(f"[data] 2/2 the target answers prompts {n0}..{len(prompts)} greedily", flush=True)
    bar = tqdm(total=len(prompts), initial=n0, desc="[data] answers", unit="prompt")
    for start in range(n0, len(prompts), chunk):
        part = prompts[start: start + chunk]
        new = [r for r in answer(part) if r is not None]
        with open(seq_file, "a") as f:
            for r in new:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        rows += new
        _write_progress(seq_file, start + len(part), len(rows))
        bar.update(len(part))
    bar.close()
    return rows


def build_dataset(
    model_dir: str,
    out_dir: str | Path,
    num_prompts: int = 600,
    max_new_tokens: int = 256,
    prompts_jsonl: str | None = None,
    seed: int = 0,
    extra_prompts_jsonl: str | list[str] | None = None,
    extra_prompts: int | list[int] = 0,
) -> Path:
    """Stages 1-2. Returns the path of sequences.jsonl (prompt_ids, response_ids).

    Raising num_prompts on an existing work_dir keeps every sequence and
    answers only the new prompts; the K/V shard that held the old last
    (partial) chunk is removed so that stage 3 rebuilds it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq_file = out / "sequences.jsonl"
    prompt_file = out / "prompts.jsonl"
    llm = None

    def get_llm():
        nonlocal llm
        if llm is None:
            llm = _llm(model_dir, 2048)
        return llm

    if seq_file.exists() and not _progress_file(seq_file).exists():
        # A finished run from before chunked answering wrote sequences.jsonl
        # once, at the end, for every prompt in prompts.jsonl: record that
        # before prompts.jsonl grows.
        n_prompts = len(_read_jsonl(prompt_file)) if prompt_file.exists() else 0
        _write_progress(seq_file, n_prompts, len(_read_jsonl(seq_file)))
    prompts = _extend_prompts(prompt_file, num_prompts, prompts_jsonl, seed, get_llm, extra_prompts_jsonl,
                              extra_prompts)
    done = json.loads(_progress_file(seq_file).read_text()) if seq_file.exists() else None
    if done and done["prompts"] < len(prompts):
        drop_stale_kv_shard(out, done["rows"])  # before answering: a crash must not leave it

    def answer(part: list[str]) -> list[dict | None]:
        from vllm import SamplingParams

        outs = get_llm().chat([[{"role": "user", "content": p}] for p in part],
                              SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
        return [{"prompt_ids": list(o.prompt_token_ids), "response_ids": list(o.outputs[0].token_ids)}
                if len(o.outputs[0].token_ids) >= 4 else None for o in outs]

    rows = answer_prompts(prompts, seq_file, answer)
    n_tok = sum(len(r["response_ids"]) for r in rows)
    print(f"[data] {len(rows)} sequences, {n_tok} response tokens -> {seq_file}", flush=True)
    del llm
    return seq_file


def drop_stale_kv_shard(out: Path, old_rows: int, shard_size: int = SHARD_SIZE) -> None:
    """The shard holding rows [k*shard_size, old_rows) was partial; it must be rebuilt."""
    if old_rows % shard_size:
        start = old_rows // shard_size * shard_size
        for p in out.glob(f"kv_s*/shard_{start:06d}.pt"):
            p.unlink()


@torch.no_grad()
def deep_kv_for(target, ids: list[int], deep_layers: range) -> torch.Tensor:
    """[n_deep, 2, T, Hkv, D] post-RoPE K/V of the real tokens in the deep layers.

    Computed with the reference forward (same code the decoder uses), so the
    K/V the masks see in training are exactly those they see at inference.
    """
    from flexdraft_vllm.reference.forward import RequestCache, step_forward

    out = step_forward(target, None, [RequestCache()], [torch.tensor(ids)])
    return torch.stack([torch.stack([out.new_k[0][l], out.new_v[0][l]]) for l in deep_layers])


def build_kv_shards(target, seq_file: Path, deep_layers: range, shard_size: int = SHARD_SIZE, max_len: int = 512) -> list[Path]:
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
