import importlib.metadata

import flexdraft_vllm


def test_register_is_idempotent():
    flexdraft_vllm.register()
    assert flexdraft_vllm.is_registered()
    flexdraft_vllm.register()  # second call is a no-op, must not raise
    assert flexdraft_vllm.is_registered()


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "flexdraft"]
    assert len(ours) == 1 and ours[0].value == "flexdraft_vllm:register"
    assert ours[0].load() is flexdraft_vllm.register
