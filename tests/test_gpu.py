"""The GPU code paths of the GPT (cuDNN attention, the remat policies around it, the model the GPU benchmark
compares with the plain reference step), checked on a GPU. Skipped elsewhere: the test suite forces the CPU
(tests/conftest.py), so run these on a GPU host with ``JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdist.models import gpt
from tests.conftest import benchmark_module

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")

CFG = gpt.GPTConfig(vocab_size=512, seq_len=256, d_model=256, n_layers=2, n_heads=4, compute_dtype=jnp.bfloat16,
                    attention_impl="cudnn")
BATCH = gpt.synthetic_tokens(jax.random.key(1), 4, CFG)


def _assert_leaves_close(actual, expected, rtol, what):
  """Each leaf within ``rtol`` of the expected one in relative norm: a leaf zeroed or off by a factor fails,
  where one cosine over all leaves would hide it behind the large ones."""
  for i, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected))):
    a, e = (np.asarray(x, np.float32) for x in (a, e))
    err = np.linalg.norm(a - e) / np.linalg.norm(e)
    assert err < rtol, f"{what}: leaf {i} {e.shape} off by {err:.2e} (relative norm), more than {rtol}"


def test_cudnn_attention_matches_xla():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 256, 4, 64), jnp.bfloat16)
  f = lambda impl: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(gpt.attention(q, k, v, impl).astype(
      jnp.float32) ** 2), argnums=(0, 1, 2)))(q, k, v)
  (l_c, g_c), (l_x, g_x) = f("cudnn"), f("xla")
  np.testing.assert_allclose(float(l_c), float(l_x), rtol=1e-2)
  _assert_leaves_close(g_c, g_x, 5e-2, "dq, dk, dv: cuDNN against XLA")


def test_dots_saveable_keeps_cudnn_attention_and_the_gradients():
  params = gpt.init(jax.random.key(0), CFG)
  layer, x = jax.tree.map(lambda a: a[0], params["blocks"]), jnp.zeros((2, CFG.seq_len, CFG.d_model), jnp.bfloat16)
  cfg = gpt.GPTConfig(**{**CFG.__dict__, "remat": "dots_saveable"})
  eqns = jax.make_jaxpr(lambda p, x: gpt.block(p, x, cfg))(layer, x).jaxpr.eqns
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert [e.params["policy"] for e in eqns if "remat" in e.primitive.name or "checkpoint" in e.primitive.name] == [
      dots, dots]  # the attention between them is not rematerialised
  ref = jax.jit(jax.value_and_grad(gpt.loss_fn(CFG)))(params, BATCH)
  for remat in ("dots_saveable", "full"):
    ours = jax.jit(jax.value_and_grad(gpt.loss_fn(gpt.GPTConfig(**{**CFG.__dict__, "remat": remat}))))(params, BATCH)
    np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-3)
    _assert_leaves_close(ours[1], ref[1], 2e-2, remat)  # bf16: 0.5-0.7% measured on the CPU (XLA attention)


def test_jdist_gpt_is_the_plain_reference_gpt(monkeypatch):
  # the benchmark compares the same model: the plain step's parameters, laid out as jdist's, give the same
  # loss and gradients (fp32 with XLA attention at full matmul precision; bf16 with cuDNN, as benchmarked)
  plain = benchmark_module(monkeypatch, "_plain_gpt")
  V, D, L, H, S = CFG.vocab_size, CFG.d_model, CFG.n_layers, CFG.n_heads, CFG.seq_len
  p = plain.init(jax.random.key(3), V, D, L, H, S)

  def as_jdist(p):
    stack = lambda name: jnp.stack([b[name] for b in p["blocks"]])
    blocks = {name: stack(name) for name in ("ln1", "o", "ln2", "fc", "proj")}
    blocks["qkv"] = stack("qkv").reshape(L, D, 3, D)
    return {"wte": p["wte"], "wpe": p["wpe"], "lnf": p["lnf"], "blocks": blocks}

  def plain_loss(impl, dtype):
    def loss(p, tok):
      logits = plain.fwd(p, tok[:, :-1], H, impl) if dtype == jnp.bfloat16 else fwd32(p, tok[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()
    return loss

  def fwd32(p, tok):  # the reference's fwd in fp32 (it hard-codes bf16)
    x = p["wte"][tok] + p["wpe"][:tok.shape[1]]
    for b in p["blocks"]:
      h = plain.rms(x, b["ln1"])
      qkv = (h @ b["qkv"]).reshape(*tok.shape, 3, H, D // H)
      a = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
                                       implementation="xla").reshape(*tok.shape, D)
      x = x + a @ b["o"]
      x = x + jax.nn.gelu(plain.rms(x, b["ln2"]) @ b["fc"]) @ b["proj"]
    return plain.rms(x, p["lnf"]) @ p["wte"].T

  for dtype, impl, rtol, grad_rtol in ((jnp.float32, "xla", 1e-5, 1e-4), (jnp.bfloat16, "cudnn", 1e-3, 3e-2)):
    cfg = gpt.GPTConfig(**{**CFG.__dict__, "compute_dtype": dtype, "attention_impl": impl})
    with jax.default_matmul_precision("highest"):
      l_p, g_p = jax.jit(jax.value_and_grad(plain_loss(impl, dtype)))(p, BATCH["tokens"])
      l_j, g_j = jax.jit(jax.value_and_grad(gpt.loss_fn(cfg)))(as_jdist(p), BATCH)
    np.testing.assert_allclose(float(l_j), float(l_p), rtol=rtol)
    _assert_leaves_close(g_j, as_jdist(g_p), grad_rtol, f"jdist against the plain GPT, {jnp.dtype(dtype).name}")
