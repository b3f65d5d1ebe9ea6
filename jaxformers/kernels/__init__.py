"""Fused kernels (Pallas) with plain-jnp reference twins."""
