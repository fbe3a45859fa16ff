"""pbas_jax: PBAS (Progressive Boundary guided Anomaly Synthesis) in JAX/Flax."""

__version__ = "0.1.0"
