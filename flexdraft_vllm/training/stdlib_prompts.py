"""Code prompts from the Python standard library: signature + docstring, body left out.

  python -m flexdraft_vllm.training.stdlib_prompts --out flexdraft_vllm/data/stdlib_prompts.jsonl

Self-synthesised prompts are mostly chat; their code prompts are whatever the
target writes after "def ", which are rarely real functions. The standard
library ships thousands of documented functions: each public module-level
function (and public method) with a docstring of reasonable length becomes

    Complete this Python function. Reply with code only.

    def name(args):
        \"\"\"docstring\"\"\"

the shape of a code-completion request (the same instruction HumanEval
prompts get in prompts.py; HumanEval itself stays held out). Tests, private
modules (leading underscore), idlelib/tkinter/test packages and
duplicate names are skipped; the prompts are collected in sorted module
path and source order, then shuffled with a fixed seed (so the first N are a
sample across the library), and a given Python version always yields the
same file. The bundled JSONL was made with CPython 3.11.7; a training config
names it in `extra_prompts_jsonl`, so a different local Python changes nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path

from flexdraft_vllm.prompts import CODE_INSTRUCTION as INSTRUCTION
SKIP_PARTS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "__pycache__", "pydoc_data", "encodings"}


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = ast.unparse(fn.args)
    ret = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    return f"{'async ' if isinstance(fn, ast.AsyncFunctionDef) else ''}def {fn.name}({args}){ret}:"


def function_prompts(source: str, min_doc: int = 40, max_doc: int = 700) -> list[tuple[str, str]]:
    """(qualified name, prompt) of the documented public functions and methods of one module."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node, clean=True)
                if not doc or not min_doc <= len(doc) <= max_doc:
                    continue
                body_doc = "\n".join(("    " + line) if line else "" for line in doc.splitlines())
                text = f"{_signature(node)}\n    \"\"\"{body_doc.strip()}\n    \"\"\"\n"
                if len(text) > 1200:
                    continue
                out.append((prefix + node.name, INSTRUCTION + text))

    visit(tree.body, "")
    return out


def stdlib_prompts(root: Path | None = None) -> list[str]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    seen_names, seen_text, out = set(), set(), []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIP_PARTS or p.startswith("_") for p in rel.parts[:-1]) or rel.name.startswith(("_", "test")):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for name, prompt in function_prompts(source):
            short = name.rsplit(".", 1)[-1]
            if short in seen_names or prompt in seen_text:  # one prompt per function name
                continue
            seen_names.add(short)
            seen_text.add(prompt)
            out.append(prompt)
    random.Random(0).shuffle(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stdlib", type=Path, default=None, help="stdlib folder (default: this Python's)")
    args = ap.parse_args(argv)
    prompts = stdlib_prompts(args.stdlib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"{len(prompts)} prompts -> {args.out}")


if __name__ == "__main__":
    main()
