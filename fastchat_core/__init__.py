"""fastchat-core: train and serve your own small ChatGPT, fast."""
__version__ = "0.1.0"
