"""alignjax: aligning generative models with rewards and preferences, in JAX/Flax NNX."""

__version__ = "0.1.0"
