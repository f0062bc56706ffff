"""An Engine built from a checkpoint: what `fastchat chat` and `fastchat serve` start from."""
from pathlib import Path

import torch

from fastchat_core.checkpoint import CheckpointError, load_model, newest_checkpoint, resolve_checkpoint
from fastchat_core.common import ConfigError, home_dir
from fastchat_core.engine.engine import Engine
from fastchat_core.tokenizer import Tokenizer, get_tokenizer

STAGES = ("rl", "sft", "mid", "base")   # most finished first


def default_checkpoint() -> Path:
    """The newest checkpoint of the most finished stage: $FASTCHAT_HOME/{rl,sft,mid,base}/<run>, in that order."""
    ckpt = newest_checkpoint(STAGES)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint under {home_dir()}/{{{','.join(STAGES)}}}: train one "
                              "(`fastchat train base`) or pass --checkpoint DIR")
    return ckpt


def load_engine(checkpoint=None, *, tokenizer=None, device=None, dtype=None,
                **engine_kwargs) -> tuple[Engine, Tokenizer, Path]:
    """(Engine, tokenizer, checkpoint folder) for a checkpoint or run folder (default: default_checkpoint()).

    tokenizer: a tokenizer.json (default: the one the checkpoint was trained with, else $FASTCHAT_HOME's);
    device: "cuda" / "cpu" (default: cuda when available); dtype: a torch dtype or its name (default:
    bfloat16 on cuda, float32 on cpu); engine_kwargs go to Engine (kv_fraction, max_num_seqs, ...).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ckpt = resolve_checkpoint(checkpoint or default_checkpoint())
    model, meta = load_model(ckpt, device, dtype)
    try:
        tok = get_tokenizer(tokenizer or meta.get("args", {}).get("tokenizer"))
    except FileNotFoundError as e:
        raise ConfigError(f"{e}\n(or pass --tokenizer PATH: the tokenizer {ckpt} was trained with)") from None
    if tok.vocab_size != model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but {ckpt} was trained with "
                          f"{model.config.vocab_size}: pass --tokenizer with the one it was trained with")
    return Engine(model, tok, **engine_kwargs), tok, ckpt
