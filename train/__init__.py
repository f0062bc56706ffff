"""The stage drivers (`fastchat train ...`). Installed as `fastchat_core.train` (setup.py maps this folder):
run them as `python -m fastchat_core.train.base` or under torchrun."""
