"""Engine arguments that make vLLM behave on the machines this project runs on.

On vLLM's CPU backend `gpu_memory_utilization` is a fraction of the NUMA
node's memory, which on small containers is less than vLLM's 0.92 default
asks for; an explicit KV-cache size is both safer and reproducible.

Also on CPU: the multiprocess executor puts the worker in its own process
and the engine core busy-waits (sched_yield loop) on the worker's
shared-memory reply queue, which takes a whole core from the worker's
OpenMP threads. With one worker there is nothing to distribute, so the
in-process ("uni") executor is asked for. vLLM 0.32's CPU platform keeps it
only when the engine core itself runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0); with its default (1) it switches back to
"mp" so that it can set up OpenMP in the worker. In one process plain vLLM
measured 27 vs 16 tok/s at batch 1 on a 2-core Intel Xeon (SmolLM2-135M
fp32, greedy, 64 tokens per request); tests keep the default (several
engines start and stop in one pytest process).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def default_engine_kwargs(**overrides: Any) -> dict[str, Any]:
    """kwargs for `vllm.LLM(...)`: fp32 + explicit KV-cache size on CPU."""
    kw: dict[str, Any] = {"seed": 0}
    if on_cpu():
        kv_gib = float(os.environ.get("FLEXDRAFT_KV_GIB", "1"))
        kw.update(dtype="float32", kv_cache_memory_bytes=int(kv_gib * (1 << 30)), enforce_eager=True,
                  distributed_executor_backend="uni")
    kw.update(overrides)
    return kw
