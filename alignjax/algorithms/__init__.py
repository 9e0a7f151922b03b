"""One module per algorithm: pure losses and jittable updates.

ddpo              policy gradient over the denoising chain (DDPO-SF, DDPO-IS)
draft             reward backpropagation through the sampler (DRaFT, DRaFT-K, DRaFT-LV)
adjoint_matching  reward fine-tuning as memoryless stochastic optimal control (flow models)
adjoint_matching_ddpm  the same for DDPM/DDIM noise-prediction models (eta = 1)
dpo               offline preference losses over sequence log-probs (DPO/cDPO, IPO, SPPO)
policy_gradient   online LM policy gradients (GRPO, RLOO/REINFORCE, online IPO, k3 KL)
preference_model  reward and preference models: Bradley–Terry, pairwise/GPM losses, trainers
nash_md           Nash-MD: the policy-gradient loss against a geometric-mixture opponent, and
                  the tabular mirror-descent update
spo               SPO: win-rate rewards within a group, its policy-gradient loss, tabular
                  self-play
games             tabular preference games: equilibria, exploitability, the RLHF baseline
"""

from alignjax.algorithms import (
    adjoint_matching,
    adjoint_matching_ddpm,
    ddpo,
    dpo,
    draft,
    games,
    nash_md,
    policy_gradient,
    preference_model,
    spo,
)

__all__ = [
    "adjoint_matching",
    "adjoint_matching_ddpm",
    "ddpo",
    "dpo",
    "draft",
    "games",
    "nash_md",
    "policy_gradient",
    "preference_model",
    "spo",
]
