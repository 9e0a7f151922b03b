"""Hand-written kernels, each an XLA FFI custom call with a plain-JAX fallback."""
