"""resnet_jax: residual networks in pure JAX/Flax."""
