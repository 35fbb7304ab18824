"""The plain jax.jit + optax GPT of shared/reference/plain_jax_gpt.py (its init, rms and fwd, unchanged),
importable so benchmarks/gpu_gpt.py can run it beside jdist in the same process on the same card."""
import jax
import jax.numpy as jnp


def init(key, V, D, L, H, S):
    ks = jax.random.split(key, 4 + 4 * L)
    s = 0.02
    p = {"wte": jax.random.normal(ks[0], (V, D)) * s, "wpe": jax.random.normal(ks[1], (S, D)) * s, "blocks": []}
    for i in range(L):
        k = ks[4 + 4 * i: 8 + 4 * i]
        p["blocks"].append({"ln1": jnp.ones(D), "qkv": jax.random.normal(k[0], (D, 3 * D)) * s,
                            "o": jax.random.normal(k[1], (D, D)) * s, "ln2": jnp.ones(D),
                            "fc": jax.random.normal(k[2], (D, 4 * D)) * s,
                            "proj": jax.random.normal(k[3], (4 * D, D)) * s})
    p["lnf"] = jnp.ones(D)
    return p

def rms(x, g):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * g).astype(x.dtype)

def fwd(p, tok, H, impl):
    B, S = tok.shape
    cd = jnp.bfloat16
    x = (p["wte"][tok] + p["wpe"][:S]).astype(cd)
    D = x.shape[-1]
    for b in p["blocks"]:
        h = rms(x, b["ln1"])
        qkv = (h @ b["qkv"].astype(cd)).reshape(B, S, 3, H, D // H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl).reshape(B, S, D)
        x = x + a @ b["o"].astype(cd)
        h = rms(x, b["ln2"])
        x = x + jax.nn.gelu(h @ b["fc"].astype(cd)) @ b["proj"].astype(cd)
    x = rms(x, p["lnf"])
    return (x @ p["wte"].astype(cd).T).astype(jnp.float32)
