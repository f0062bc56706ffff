"""Model configuration: one dataclass, sized by depth as nanochat does."""
from dataclasses import asdict, dataclass


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
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

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

    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def n_head(self) -> int:
        return self.dim // self.head_dim

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls: every block's weights plus the LM head (not the embedding)."""
        d, kv = self.dim, self.n_kv_head * self.head_dim
        attn = d * d + 2 * d * kv + d * d
        mlp = 2 * self.mlp_ratio * d * d
        return self.n_layer * (attn + mlp) + self.vocab_size * d

    def num_params(self) -> int:
        return self.matmul_params() + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """6N + attention (PaLM convention: 12 * layers * heads * head_dim * T), as PERF.md counts it."""
        t = seq_len or self.seq_len
        return 6 * self.matmul_params() + 12 * self.n_layer * self.n_head * self.head_dim * t

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)
