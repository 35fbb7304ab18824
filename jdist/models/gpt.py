"""A small GPT as pure functions: RMSNorm, causal attention, GELU MLP, tied embeddings.

Block parameters are stacked on a leading layer axis and the blocks run under ``jax.lax.scan``, so
compile time does not grow with depth and pipeline stages can slice the stack. ``scan_unroll=True``
trades compile time back for a straight-line program, the same arithmetic: on a GPU the faster one, as
the scan stores every block's intermediate values for the backward pass (measured on an H200 at 12-16
layers: straight-line, jdist's step took the plain jitted step's time; the scan's took 1.21-1.33x it,
1.10-1.14x with ``remat="dots_saveable"``; benchmarks/RESULTS.md). Compute may run in bf16 while
parameters stay fp32 (``GPTConfig.compute_dtype``); ``remat`` picks a ``jax.checkpoint`` policy for the
blocks.

Parameter layout (L layers, D model width, V vocabulary, S context)::

  wte: f32[V, D]   wpe: f32[S, D]   lnf: f32[D]
  blocks: ln1 f32[L, D], qkv f32[L, D, 3, D], o f32[L, D, D], ln2 f32[L, D], fc f32[L, D, 4D], proj f32[L, 4D, D]

The last axis of ``qkv`` and the first of ``o`` run over heads (H blocks of D/H), so splitting them
over a ``model`` mesh axis splits attention by heads (Megatron); ``TP_RULES`` says so.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jdist._types import Batch, Params

REMAT_POLICIES = ("none", "dots_saveable", "full")
_SAVE_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable  # "dots_saveable", inside ``block``
STACKED = (r"^blocks/",)  # parameters whose leading axis stacks the layers (e.g. jdist.reducers.powersgd(stacked=...))
ATTENTION_IMPLS = ("auto", "cudnn", "xla", None)

# Megatron tensor parallelism over a "model" mesh axis: attention split by heads (qkv by output
# columns, o by input rows), the MLP's first matrix by columns and its second by rows, so each block
# does one all-reduce of activations after attention and one after the MLP, forward and backward. The
# model axis should divide n_heads: with fewer heads than devices GSPMD re-shards the attention (still
# correct, with 1.5x the all-reduce bytes measured for 4 heads on 8 devices).
TP_RULES = (
    (r"^blocks/qkv$", (None, None, None, "model")),
    (r"^blocks/o$", (None, "model", None)),
    (r"^blocks/fc$", (None, None, "model")),
    (r"^blocks/proj$", (None, "model", None)),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
  vocab_size: int = 256  # tokens; byte-level text by default
  seq_len: int = 64  # context length S (tokens per example; batches hold S + 1 for the shifted target)
  d_model: int = 128  # width D; divisible by n_heads
  n_layers: int = 2  # blocks L
  n_heads: int = 4  # attention heads H
  compute_dtype: Any = jnp.float32  # activations and matmuls; params stay fp32
  remat: str = "none"  # one of REMAT_POLICIES
  attention_impl: str | None = "auto"  # "auto" (cuDNN where it applies, else XLA), "cudnn", "xla" or None (XLA)
  scan_unroll: int | bool = 1  # blocks per scan iteration (True: all, one straight-line program)

  def __post_init__(self):
    for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}).")
    if not (self.scan_unroll is True or (type(self.scan_unroll) is int and self.scan_unroll >= 1)):
      raise ValueError(f"GPTConfig.scan_unroll must be a positive int or True (unroll every block), got "
                       f"{self.scan_unroll!r}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"Unknown attention_impl: {self.attention_impl!r}. It needs to be one of "
                       f"{list(ATTENTION_IMPLS)}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat policy: {self.remat!r}. It needs to be one of {list(REMAT_POLICIES)}.")

  def num_params(self) -> int:
    D, L = self.d_model, self.n_layers
    return self.vocab_size * D + self.seq_len * D + D + L * (2 * D + 12 * D * D)


def init(key: jax.Array, config: GPTConfig) -> Params:
  """Normal(0, 0.02) weights (output projections scaled by 1/sqrt(2L)), unit norms."""
  D, L, s = config.d_model, config.n_layers, 0.02
  k = jax.random.split(key, 6)
  out_scale = s / jnp.sqrt(2.0 * L)
  return {
      "wte": jax.random.normal(k[0], (config.vocab_size, D)) * s,
      "wpe": jax.random.normal(k[1], (config.seq_len, D)) * s,
      "blocks": {
          "ln1": jnp.ones((L, D)),
          "qkv": jax.random.normal(k[2], (L, D, 3, D)) * s,
          "o": jax.random.normal(k[3], (L, D, D)) * out_scale,
          "ln2": jnp.ones((L, D)),
          "fc": jax.random.normal(k[4], (L, D, 4 * D)) * s,
          "proj": jax.random.normal(k[5], (L, 4 * D, D)) * out_scale,
      },
      "lnf": jnp.ones((D,)),
  }


def rms_norm(x: jax.Array, gain: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * gain).astype(x.dtype)


def block(p: Params, x: jax.Array, config: GPTConfig) -> jax.Array:
  """One transformer block. x: [B, S, D] in the compute dtype; p: one layer's slice of ``blocks``.

  ``config.remat == "dots_saveable"`` rematerialises the projections and the MLP around the attention: the
  backward pass keeps their matmul outputs and recomputes the norms, GELU and residual sums. cuDNN's fused
  attention is kept (its output and O(S) softmax statistics); XLA's is recomputed from q, k, v rather than
  keeping its S x S probabilities.
  """
  B, S, D = x.shape
  H = config.n_heads
  cd = config.compute_dtype

  def qkv_proj(p, x):
    h = rms_norm(x, p["ln1"])
    return jnp.einsum("bsd,dtk->bstk", h, p["qkv"].astype(cd)).reshape(B, S, 3, H, D // H)

  def out_and_mlp(p, x, a):
    x = x + a.reshape(B, S, D) @ p["o"].astype(cd)
    h = rms_norm(x, p["ln2"])
    return x + jax.nn.gelu(h @ p["fc"].astype(cd)) @ p["proj"].astype(cd)

  dots = config.remat == "dots_saveable"
  if dots:
    qkv_proj, out_and_mlp = (jax.checkpoint(f, policy=_SAVE_DOTS) for f in (qkv_proj, out_and_mlp))
  qkv = qkv_proj(p, x)
  a = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], config.attention_impl, recompute_xla=dots)
  return out_and_mlp(p, x, a)


def attention_backend(impl: str | None, dtype: Any, head_dim: int, platform: str | None = None) -> str:
  """The ``jax.nn.dot_product_attention`` implementation ``impl`` stands for.

  "auto" means cuDNN's fused attention where it applies (a GPU, bf16 or fp16, head size a multiple of 8
  up to 128), else XLA's; "cudnn" and "xla" are themselves; None is XLA (JAX's own default).
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"Unknown attention implementation {impl!r}. It needs to be one of {list(ATTENTION_IMPLS)}.")
  if impl == "auto":
    platform = platform if platform is not None else jax.default_backend()
    fits = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0
            and head_dim <= 128)
    return "cudnn" if platform == "gpu" and fits else "xla"
  return impl or "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None, *,
              recompute_xla: bool = False) -> jax.Array:
  """Causal attention, q, k, v: [B, S, H, D/H]; ``impl`` as in ``attention_backend``.

  With "auto", a cuDNN that refuses the call (an old GPU or cuDNN version: JAX checks while tracing)
  falls back to XLA's implementation. ``recompute_xla``: XLA's attention runs under ``jax.checkpoint``
  (the backward pass recomputes it instead of keeping its S x S probabilities); cuDNN's keeps only O(S).
  """
  backend = attention_backend(impl, q.dtype, q.shape[-1])
  if backend == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError, TypeError):
      if impl != "auto":
        raise
  xla = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")
  return (jax.checkpoint(xla) if recompute_xla else xla)(q, k, v)


def _remat(fn, policy: str):
  # "full": the whole block recomputed in the backward pass; "dots_saveable" is applied inside ``block``
  return jax.checkpoint(fn) if policy == "full" else fn


def valid_tokens(tokens: jax.Array, config: GPTConfig, *, max_len: int) -> jax.Array:
  """``tokens`` with every id outside [0, vocab_size) replaced by vocab_size, which the embedding and the
  loss read as NaN (``mode="fill"``): a bad id makes the loss NaN, so ``NanGuard`` stops the run, instead
  of being clamped or wrapped to another token in silence. Checks the length (at most ``max_len``).
  """
  if tokens.ndim != 2 or tokens.shape[1] > max_len:
    raise ValueError(f"tokens have shape {tokens.shape}; expected int[batch, S] with S <= {max_len} (GPTConfig.seq_len "
                     f"= {config.seq_len}; a training batch holds seq_len + 1 tokens: the inputs and the shifted "
                     f"targets). Cut the sequences or build the model with a larger seq_len.")
  V = config.vocab_size
  return jnp.where((tokens >= 0) & (tokens < V), tokens, V)


def embed(params: Params, tokens: jax.Array, config: GPTConfig) -> jax.Array:
  """tokens: int[B, S] -> x: [B, S, D] in the compute dtype (NaN rows for ids outside the vocabulary)."""
  tokens = valid_tokens(tokens, config, max_len=config.seq_len)
  S = tokens.shape[1]
  wte = jnp.take(params["wte"], tokens, axis=0, mode="fill", fill_value=jnp.nan)
  return (wte + params["wpe"][:S]).astype(config.compute_dtype)


def head(params: Params, x: jax.Array) -> jax.Array:
  """x: [B, S, D] -> fp32 logits [B, S, V] through the tied embedding."""
  x = rms_norm(x, params["lnf"])
  return (x @ params["wte"].astype(x.dtype).T).astype(jnp.float32)


def apply(params: Params, tokens: jax.Array, config: GPTConfig) -> jax.Array:
  """tokens: int[B, S] -> logits f32[B, S, V]."""
  x = embed(params, tokens, config)
  step = _remat(lambda x, p: (block(p, x, config), None), config.remat)
  x, _ = jax.lax.scan(step, x, params["blocks"], unroll=config.scan_unroll)
  return head(params, x)


def loss(params: Params, batch: Batch, config: GPTConfig) -> jax.Array:
  """Mean next-token cross-entropy; ``batch = {"tokens": int[B, S + 1]}`` (an id outside the vocabulary
  makes it NaN)."""
  targets = next_tokens(batch["tokens"], config)  # embed checks the inputs
  return cross_entropy(apply(params, batch["tokens"][:, :-1], config), targets)


def next_tokens(tokens: jax.Array, config: GPTConfig) -> jax.Array:
  """The targets of a batch's tokens int[B, S + 1]: ``tokens[:, 1:]``, the length checked and bad ids
  marked (``valid_tokens``), for ``cross_entropy``."""
  return valid_tokens(tokens, config, max_len=config.seq_len + 1)[:, 1:]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of logits [B, S, V] against targets int[B, S]: the value of
  ``optax.softmax_cross_entropy_with_integer_labels(...).mean()`` (to rounding), and NaN if any target is
  outside [0, V) (``valid_tokens`` marks bad ids with V).

  The target's logit is picked by a masked sum over the classes, not gathered: its gradient is then an
  elementwise one-hot, laid out like the logits. A gather's gradient is a scatter that GSPMD could not
  shard like the softmax's on a data x FSDP x tensor mesh, and it replicated the logits' gradient.
  """
  V = logits.shape[-1]
  picked = jnp.sum(jnp.where(jnp.arange(V) == targets[..., None], logits, 0.0), axis=-1)
  valid = (targets >= 0) & (targets < V)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.where(valid, picked, jnp.nan))


def loss_fn(config: GPTConfig):
  """``loss_fn(params, batch)`` for this config, the signature strategies take."""
  return lambda params, batch: loss(params, batch, config)


def flops_per_token(config: GPTConfig) -> float:
  """Training FLOPs per token: 6 x (parameters without the position table; the tied embedding counts once,
  as the head's matmul) plus the causal attention term 12 L D S / 2 (the score and value matmuls, forward
  and backward, halved by the causal mask), the count the team's plain-JAX reference benchmark uses."""
  D, L, S = config.d_model, config.n_layers, config.seq_len
  return 6 * (config.num_params() - S * D) + 12 * L * D * S / 2


def synthetic_tokens(key: jax.Array, batch_size: int, config: GPTConfig) -> dict[str, jax.Array]:
  """Random tokens ``{"tokens": int32[batch_size, S + 1]}`` for benchmarks and tests."""
  return {"tokens": jax.random.randint(key, (batch_size, config.seq_len + 1), 0, config.vocab_size, jnp.int32)}


def pipeline_fns(config: GPTConfig):
  """The GPT as a pipeline: ``(stage_fn, loss_fn, input_fn, to_pipeline_params)`` for ``jdist.pipeline``.

  Each block is one stage layer (rematerialised as ``config.remat`` says; ``scan_unroll`` does not apply,
  the pipeline loops over a stage's layers itself); the embedding runs before the first stage and the
  tied head and loss after the last. ``to_pipeline_params(params)`` regroups ``init``'s params as
  ``{"stages": blocks, "wte", "wpe", "lnf"}``; the pipeline's ``loss`` equals ``loss`` on them.
  """
  stage_fn = _remat(lambda layer, x: block(layer, x, config), config.remat)

  def input_fn(params, batch):
    return embed(params, batch["tokens"][:, :-1], config)

  def loss_fn(params, y, batch):
    return cross_entropy(head(params, y), next_tokens(batch["tokens"], config))

  def to_pipeline_params(params):
    return {"stages": params["blocks"], "wte": params["wte"], "wpe": params["wpe"], "lnf": params["lnf"]}

  return stage_fn, loss_fn, input_fn, to_pipeline_params
