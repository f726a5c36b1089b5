"""What register() does inside vLLM. Runs in every vLLM process.

Registration is declarative and lazy: model classes are registered by import
path so nothing heavy is imported until vLLM builds that model.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("flexdraft_vllm")


def register_with_vllm() -> None:
    from flexdraft_vllm.version_check import check_vllm_version, UnsupportedVLLMVersion

    try:
        v = check_vllm_version()
    except UnsupportedVLLMVersion as e:
        # Loading the plugin must not break vLLM for users who do not enable
        # FlexDraft; enabling it re-checks and raises this error.
        logger.warning("%s FlexDraft stays disabled.", e)
        return
    logger.debug("flexdraft_vllm registered with vLLM %s", v)
