"""A decoder-only transformer described by its sizes: what the textbook formulas need to cost a layout.

jdist's GPT maps onto it exactly (``TransformerShape.from_gpt``); published models (Megatron's GPTs, MaxText's
gated-MLP models, PaLM) are written with the same fields, so the planner's analytical model is the same one
for a user's GPT and for the runs it is validated against.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jdist.errors import OptionError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerShape:
  """Sizes of a pre-norm decoder-only transformer.

  Per layer: q, k, v, o projections (``n_heads`` x ``head_dim`` queries, ``n_kv_heads`` key/value heads), an
  MLP of width ``d_ff`` (gated: three matrices, as SwiGLU), two norms. The head is the embedding transposed
  when ``tied``.
  """

  name: str = "transformer"
  d_model: int  # width D
  n_layers: int  # L
  n_heads: int  # query heads H
  seq_len: int  # tokens per sequence S
  vocab_size: int  # V
  head_dim: int = 0  # 0: d_model // n_heads
  n_kv_heads: int = 0  # 0: n_heads (multi-head); 1: multi-query
  d_ff: int = 0  # 0: 4 * d_model
  gated_mlp: bool = False  # three MLP matrices (SwiGLU) instead of two
  tied: bool = True  # the head reuses the token embedding
  position_table: bool = False  # a learned [S, D] position embedding (jdist's GPT has one)
  act_bytes: int = 2  # bytes of an activation in the compute dtype (bf16: 2)
  param_bytes: int = 4  # bytes of a parameter as stored (fp32 master weights: 4)
  flash_attention: bool = True  # fused causal attention (cuDNN, flash, splash): no S x S scores in memory
  vocab_parallel: bool = True  # the head's matmul is split over the tensor axis (Megatron); jdist's TP_RULES: no

  def __post_init__(self):
    for name in ("d_model", "n_layers", "n_heads", "seq_len", "vocab_size"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise OptionError(f"TransformerShape.{name}", getattr(self, name), "a positive int")
    if not self.head_dim:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if not self.n_kv_heads:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if not self.d_ff:
      object.__setattr__(self, "d_ff", 4 * self.d_model)

  @classmethod
  def from_gpt(cls, config: Any, *, flash_attention: bool | None = None) -> "TransformerShape":
    """jdist's ``GPTConfig``: tied embeddings, a position table, 4D MLP, the head replicated under ``TP_RULES``.
    ``flash_attention`` defaults to whether the config's attention runs fused on a GPU (cuDNN: bf16, head size a
    multiple of 8 up to 128)."""
    import jax.numpy as jnp

    from jdist.models.gpt import attention_backend

    if flash_attention is None:
      flash_attention = attention_backend(config.attention_impl, config.compute_dtype, config.d_model // config.n_heads,
                                          platform="gpu") == "cudnn"
    return cls(name=f"gpt d{config.d_model} L{config.n_layers}", d_model=config.d_model, n_layers=config.n_layers,
               n_heads=config.n_heads, seq_len=config.seq_len, vocab_size=config.vocab_size, position_table=True,
               act_bytes=jnp.dtype(config.compute_dtype).itemsize, flash_attention=flash_attention,
               vocab_parallel=False)

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  def layer_matmul_params(self) -> int:
    """Weights of one layer's matrices (what tensor parallelism splits)."""
    attention = self.d_model * (2 * self.q_dim + 2 * self.kv_dim)
    return attention + (3 if self.gated_mlp else 2) * self.d_model * self.d_ff

  def layer_params(self) -> int:
    return self.layer_matmul_params() + 2 * self.d_model

  def embedding_params(self) -> int:
    """Token embedding (and the head when untied), position table, final norm."""
    return (self.vocab_size * self.d_model * (1 if self.tied else 2) + self.position_table * self.seq_len * self.d_model
            + self.d_model)

  def num_params(self) -> int:
    return self.n_layers * self.layer_params() + self.embedding_params()

  def layer_flops_fwd(self, *, causal_kernel: bool | None = None) -> float:
    """Forward FLOPs of one layer per token: 2 per weight, plus the score and value matmuls (4 S q_dim; half of
    that for a causal fused kernel, which skips the masked blocks)."""
    causal = self.flash_attention if causal_kernel is None else causal_kernel
    return 2.0 * self.layer_matmul_params() + (2.0 if causal else 4.0) * self.seq_len * self.q_dim

  def attention_flops_fwd(self, *, causal_kernel: bool | None = None) -> float:
    causal = self.flash_attention if causal_kernel is None else causal_kernel
    return (2.0 if causal else 4.0) * self.seq_len * self.q_dim

  def head_flops_fwd(self) -> float:
    return 2.0 * self.vocab_size * self.d_model

  def model_flops_per_token(self) -> float:
    """Training FLOPs per token without recomputation (the MFU numerator): 3 x forward, causal attention halved."""
    return 3.0 * (self.n_layers * self.layer_flops_fwd(causal_kernel=True) + self.head_flops_fwd())
