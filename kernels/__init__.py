"""FlexDraft Triton kernels, installed as `flexdraft_kernels`.

Each kernel module holds a readable PyTorch reference next to the Triton
kernel and a launcher that picks the kernel on CUDA and the reference elsewhere.
"""
