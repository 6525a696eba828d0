"""Framework-neutral helpers shared by pyro_binary_grads and numpyro_binary_grads (private)."""
