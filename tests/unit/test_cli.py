"""`flexdraft-vllm serve` builds the right `vllm serve` command line."""

from __future__ import annotations

import json

import pytest

from flexdraft_vllm.cli import patch_vllm_version_lookup, serve_argv, with_cpu_defaults


def _flag(argv, name):
    return json.loads(argv[argv.index(name) + 1])


def test_serve_adds_flexdraft_flags():
    argv = serve_argv(["/m", "--port", "8001", "--flexdraft-mode", "sequential"])
    assert argv[:4] == ["serve", "/m", "--port", "8001"]
    assert _flag(argv, "--speculative-config") == {"model": "flexdraft_vllm.FlexDraft", "num_speculative_tokens": 7}
    assert _flag(argv, "--additional-config") == {"flexdraft": {"mode": "sequential"}}
    off = serve_argv(["/m", "--prompt-lookup-max", "0"])  # prompt lookup is on unless switched off
    assert _flag(off, "--additional-config") == {"flexdraft": {"mode": "flex", "prompt_lookup_max": 0}}


def test_serve_respects_user_speculative_config_and_off():
    mine = ["/m", "--speculative-config", '{"method": "ngram"}']
    assert serve_argv(mine) == ["serve", *mine]
    assert serve_argv(["/m", "--flexdraft-mode", "off"]) == ["serve", "/m"]


def test_cpu_serve_uses_the_in_process_executor_unless_chosen():
    assert with_cpu_defaults(["serve", "/m"], on_cpu=True) == ["serve", "/m", "--distributed-executor-backend", "uni"]
    mine = ["serve", "/m", "--distributed-executor-backend", "mp"]
    assert with_cpu_defaults(mine, on_cpu=True) == mine
    assert with_cpu_defaults(["serve", "/m"], on_cpu=False) == ["serve", "/m"]


def test_serve_refuses_ambiguous_additional_config():
    with pytest.raises(SystemExit, match="additional-config"):
        serve_argv(["/m", "--additional-config", "{}"])


def test_version_lookup_answers_for_the_cpu_wheel():
    import importlib.metadata as md

    patch_vllm_version_lookup()
    import vllm

    assert md.version("vllm") == vllm.__version__.split("+")[0] or md.version("vllm")
