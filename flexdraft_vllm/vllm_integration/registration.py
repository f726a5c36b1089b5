"""What register() does inside vLLM. Runs in every vLLM process.

Cheap and lazy: the runner patch wraps one method (imports vLLM's runner
module, which every engine process imports anyway); the proposer class is
imported by vLLM only when a speculative_config names it.
"""

from __future__ import annotations

import logging

# a child of "vllm" so vLLM's logging config (handler, level, VLLM_LOGGING_LEVEL) applies
logger = logging.getLogger("vllm.flexdraft")


def register_with_vllm() -> None:
    from flexdraft_vllm.version_check import UnsupportedVLLMVersion, check_vllm_version

    try:
        v = check_vllm_version()
    except UnsupportedVLLMVersion as e:
        # Loading the plugin must not break vLLM for users who do not enable
        # FlexDraft; enabling it re-checks and raises this error.
        logger.warning("%s FlexDraft stays disabled.", e)
        return
    from flexdraft_vllm.vllm_integration import patches

    patches.apply()
    logger.debug("flexdraft_vllm registered with vLLM %s", v)
