import pytest

from flexdraft_vllm import version_check as vc


def test_installed_vllm_is_supported():
    assert vc.check_vllm_version().startswith("0.32")


@pytest.mark.parametrize("v,ok", [("0.32.0", True), ("0.32.7", True), ("0.32", True), ("0.31.2", False), ("0.320.0", False), ("1.0.0", False)])
def test_is_supported(v, ok):
    assert vc.is_supported(v) is ok


def test_unsupported_version_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(vc, "vllm_version", lambda: "0.31.0")
    with pytest.raises(vc.UnsupportedVLLMVersion, match=r"vLLM 0.31.0 is installed.*pip install"):
        vc.check_vllm_version()
