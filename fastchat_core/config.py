"""Model configuration: one dataclass, sized by depth as nanochat does.

Every ingredient of nanochat's current model is an option here, each on its own, all off by default (off is
the model and the checkpoints as they were before the options existed; an old checkpoint's saved config lacks
them and so loads with them off). NANOCHAT_RECIPE turns them all on with nanochat's values.
"""
import argparse
import math
from dataclasses import asdict, dataclass, field, fields


def _option(default, help):
    """A nanochat option: its help text is the training driver's flag help (add_model_option_args)."""
    return field(default=default, metadata={"help": help})



@dataclass
class ModelConfig:
    depth: int = 20
    vocab_size: int = 65536
    seq_len: int = 2048
    dim: int = 0           # 0: derived from depth (64 * depth rounded up to 128)
    head_dim: int = 128
    n_kv_head: int = 0     # 0: full MHA; 1: MQA; in between: GQA (must divide n_head)
    mlp_ratio: int = 4
    softcap: float = 15.0
    rope_base: float = _option(10000.0, "rotary base (nanochat: 100000)")
    norm_eps: float = 1e-6
    # ---- nanochat's ingredients (model.py says what each does) ----
    value_embeds: bool = _option(False, "value embeddings, gated, on alternating layers (the last one included)")
    layer_scalars: bool = _option(False, "per-layer learned residual and x0 (embedding) scalars")
    smear: bool = _option(False, "mix the previous token's embedding into each token, gated")
    backout: bool = _option(False, "subtract a learned share of the mid-layer residual before the final norm")
    qk_scale: float = _option(1.0, "q and k multiplied by this after the QK-norm (nanochat: 1.2)")
    nanochat_init: bool = _option(False, "nanochat's init scales: embedding std 0.8, MLP input matrix at 0.4x")
    vocab_multiple: int = _option(1, "embedding and LM head rows padded to a multiple of this (nanochat: 64)")
    window_pattern: str = _option("L", "sliding windows per layer, tiled: L = full context, S = window_short * "
                                       "seq_len; the last layer is always L (nanochat: SSSL)")
    window_short: float = _option(0.25, "the S window as a fraction of seq_len")

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.dim == 0:
            self.dim = -(-64 * self.depth // 128) * 128
        if self.dim % self.head_dim:
            raise ValueError(f"dim {self.dim} is not a multiple of head_dim {self.head_dim}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (MHA: {self.n_head}, MQA: 1)")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern must be letters S (short window) and L (full); got {self.window_pattern!r}")
        if not 0 < self.window_short <= 1 or self.vocab_multiple < 1:
            raise ValueError(f"window_short must be in (0, 1] and vocab_multiple >= 1; got {self.window_short}, "
                             f"{self.vocab_multiple}")

    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def n_head(self) -> int:
        return self.dim // self.head_dim

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and the LM head; logits beyond vocab_size are never computed."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def value_embed_layers(self) -> list[int]:
        """The layers with a value embedding: every other one, counting back from the last."""
        if not self.value_embeds:
            return []
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2]

    def windows(self) -> list[int | None]:
        """Per layer, how many earlier tokens each query sees besides itself (None: all of them). S windows are
        window_short * seq_len, rounded up to a multiple of 128 (flash-attention's tile) while that stays
        below seq_len (nanochat: 2048 -> 512); the last layer always sees everything."""
        short = math.ceil(self.window_short * self.seq_len)
        if -(-short // 128) * 128 < self.seq_len:
            short = -(-short // 128) * 128
        pattern = (self.window_pattern * self.n_layer)[:self.n_layer - 1] + "L"
        return [short if c == "S" else None for c in pattern]

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls: every block's weights plus the LM head (not the embeddings)."""
        d, kv = self.dim, self.n_kv_head * self.head_dim
        attn = d * d + 2 * d * kv + d * d
        mlp = 2 * self.mlp_ratio * d * d
        gates = len(self.value_embed_layers()) * VE_GATE_CHANNELS * self.n_kv_head
        return self.n_layer * (attn + mlp) + gates + self.padded_vocab * d

    def num_params(self) -> int:
        embed_dims = self.dim + len(self.value_embed_layers()) * self.n_kv_head * self.head_dim
        scalars = 2 * self.n_layer * self.layer_scalars + (SMEAR_CHANNELS + 1) * self.smear + self.backout
        return self.matmul_params() + self.padded_vocab * embed_dims + scalars

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """6N + attention (PaLM convention: 12 * heads * head_dim * T per layer, T capped by the layer's
        window: w earlier tokens and the query's own), as PERF.md counts it."""
        t = seq_len or self.seq_len
        attn_t = sum(t if w is None else min(w + 1, t) for w in self.windows())
        return 6 * self.matmul_params() + 12 * self.n_head * self.head_dim * attn_t

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)


VE_GATE_CHANNELS = 12   # a value embedding's gate reads this many leading channels of the attention input
SMEAR_CHANNELS = 24     # the smear gate reads this many leading channels of the token's embedding

# nanochat's current model (github.com/karpathy/nanochat, nanochat/gpt.py): every option above turned on.
NANOCHAT_RECIPE = dict(value_embeds=True, layer_scalars=True, smear=True, backout=True, qk_scale=1.2,
                       nanochat_init=True, vocab_multiple=64, window_pattern="SSSL", rope_base=100_000.0)
RECIPES = {"nanochat": NANOCHAT_RECIPE}


def add_model_option_args(group):
    """--recipe and one flag per option (--smear/--no-smear, --qk-scale 1.2, ...), each overriding the recipe."""
    group.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                       help="a model recipe's options (nanochat: every ingredient of its current model); the "
                            "option flags override it")
    for f in fields(ModelConfig):
        if "help" in f.metadata:
            flag = "--" + f.name.replace("_", "-")
            if f.type is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
            else:
                group.add_argument(flag, type=type(f.default), default=None,
                                   help=f"{f.metadata['help']} (default {f.default})")


def model_options(args) -> dict:
    """The ModelConfig options that add_model_option_args' flags select: the recipe's, then each flag given."""
    options = dict(RECIPES.get(args.recipe, {}))
    options.update({f.name: getattr(args, f.name) for f in fields(ModelConfig)
                    if "help" in f.metadata and getattr(args, f.name) is not None})
    return options
