"""Run in a fresh process with 4 fake CPU devices: sharded attention inside a jitted training step."""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from jaxformers.kernels.attention import attention_reference, local_global_mask  # noqa: E402
from jaxformers.kernels.attention.sharding import sharded_attention  # noqa: E402

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
B, L, N, D = 4, 40, 2, 32
kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
q, k, v = (jax.random.normal(x, (B, L, N, D)) for x in (kq, kk, kv))
w = jax.random.normal(kw, (B, L, N, D))
pos = np.arange(L)[None]
lengths = np.array([[40], [25], [33], [10]])
seg = jnp.asarray((pos < lengths) * (1 + (pos >= 20)), jnp.int32)  # two packed sequences, then padding
bm = local_global_mask(L, window=6, num_global=2, block_q=16, block_k=16)

qkv_sharding = NamedSharding(mesh, P("data", None, "model", None))
seg_sharding = NamedSharding(mesh, P("data", None))
q, k, v, w = (jax.device_put(x, qkv_sharding) for x in (q, k, v, w))
seg = jax.device_put(seg, seg_sharding)


def make_step(fn):
  @jax.jit
  def step(q, k, v, seg):
    def loss(q, k, v):
      return jnp.sum(fn(q, k, v, seg) * w)
    val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    return val, grads, fn(q, k, v, seg)
  return step


for name, kwargs, ref_mask in [("dense", {}, None), ("block_sparse", {"block_mask": bm}, bm.token_mask())]:
  kernel = make_step(lambda q, k, v, seg: sharded_attention(q, k, v, mesh=mesh, batch_axes="data", head_axes="model",
                                                            segment_ids=seg, impl="pallas", **kwargs))
  ref = make_step(lambda q, k, v, seg: attention_reference(
      q, k, v, segment_ids=seg, mask=None if ref_mask is None else jnp.asarray(ref_mask)[None, None]))
  val, grads, out = kernel(q, k, v, seg)
  rval, rgrads, rout = ref(q, k, v, seg)
  assert out.sharding.spec == P("data", None, "model", None), out.sharding
  np.testing.assert_allclose(out, rout, atol=1e-5)
  np.testing.assert_allclose(val, rval, rtol=1e-5)
  for g, rg in zip(grads, rgrads):
    np.testing.assert_allclose(g, rg, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(kernel)(q, k, v, seg))
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr, name
  print(name, "OK")
print("SHARDED OK")
