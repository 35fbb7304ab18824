"""Mixed precision as a loss-function wrapper, so every strategy that takes ``loss_fn(params, batch)`` accepts it
unchanged (all but the pipeline, whose ``stage_fn`` / ``input_fn`` / ``loss_fn`` cast for themselves).

``mixed_precision(loss_fn, compute_dtype=jnp.bfloat16)`` returns a loss function that casts the
floating-point parameters and batch leaves to ``compute_dtype`` before calling ``loss_fn`` and returns
the loss in fp32. The parameters and the optimizer state stay in their own
dtype (fp32 master weights): the gradient flows back through the cast and arrives in fp32. With
``compute_dtype=jnp.float32`` it is the identity, so fp32 equivalence tests are untouched.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jdist._types import Batch, Params


def _cast_floating(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def mixed_precision(loss_fn: Callable[..., Any], *, compute_dtype=jnp.bfloat16, cast_batch: bool = True,
                    has_aux: bool = False) -> Callable[[Params, Batch], Any]:
  """Wraps ``loss_fn(params, batch)`` to compute in ``compute_dtype`` with fp32 master parameters.

  Args:
    loss_fn: the loss to wrap (returns a scalar, or ``(scalar, aux)`` with ``has_aux``).
    compute_dtype: the dtype the forward and backward passes run in (bf16 on accelerators).
    cast_batch: also cast floating batch leaves (integer tokens and labels are never cast). On by
      default: an fp32 input would promote the low-precision weights back to fp32 at the first matmul.
      Pass False to keep, e.g., regression targets in fp32.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``loss(params, batch)``, its loss in fp32.

  A model that casts inside, as the GPT does (``GPTConfig.compute_dtype``), follows its own setting: with
  the default fp32 there it computes in fp32 on bf16-rounded weights. Set both.

  Example:
    >>> cfg = gpt.GPTConfig(compute_dtype=jnp.bfloat16)  # doctest: +SKIP
    >>> strategy = jdist.data_parallel(mixed_precision(gpt.loss_fn(cfg)), optax.adamw(3e-4), mesh)  # doctest: +SKIP
  """
  try:
    floating = jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise TypeError(f"compute_dtype must be a floating-point dtype (jnp.bfloat16, jnp.float16 or jnp.float32), got "
                    f"{compute_dtype!r}: parameters cast to it would get no gradient.")

  def wrapped(params, batch, *more):
    if more:  # the pipeline's loss_fn(params, y, batch): the activations y come from stage_fn, not from here
      raise TypeError(f"mixed_precision wraps a loss_fn(params, batch), but it was called with {2 + len(more)} "
                      f"arguments, as jdist.pipeline calls its loss_fn(params, y, batch). A pipeline computes in "
                      f"low precision by casting inside its own functions, e.g. layer and x to jnp.bfloat16 in "
                      f"stage_fn, and returns its loss in float32.")
    low = _cast_floating(params, compute_dtype)
    if cast_batch:
      batch = _cast_floating(batch, compute_dtype)
    out = loss_fn(low, batch)
    if has_aux != isinstance(out, tuple) or (has_aux and len(out) != 2):
      raise TypeError(f"mixed_precision(loss_fn, has_aux={has_aux}): loss_fn returned a "
                      f"{type(out).__name__}{f' of {len(out)}' if isinstance(out, tuple) else ''}. A loss with "
                      f"auxiliary output returns (loss, aux): pass has_aux=True to mixed_precision and to the "
                      f"strategy; otherwise return the scalar loss alone.")
    if has_aux:
      loss, aux = out
      return loss.astype(jnp.float32), aux
    return out.astype(jnp.float32)

  return wrapped
