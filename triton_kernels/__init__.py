"""Triton kernels, one family per file with its PyTorch reference beside it. Installed as
`fastchat_core.triton_kernels` (setup.py maps this folder), so import it by that name."""
