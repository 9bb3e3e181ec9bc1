"""r1jax: the DeepSeek-R1 training recipe in JAX."""
