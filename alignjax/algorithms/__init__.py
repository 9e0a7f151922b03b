"""One module per algorithm: pure losses and jittable updates.

  ddpo              policy gradient over the denoising chain (DDPO-SF, DDPO-IS)
  draft             reward backpropagation through the sampler (DRaFT, DRaFT-K, DRaFT-LV)
  adjoint_matching  reward fine-tuning as memoryless stochastic optimal control
"""

from alignjax.algorithms import adjoint_matching, ddpo, draft

__all__ = ["adjoint_matching", "ddpo", "draft"]
