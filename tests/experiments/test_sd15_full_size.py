"""The full-size Stable Diffusion 1.5 configs: one training step of each algorithm, traced with
`jax.eval_shape` on the full-size UNet (859,520,964 parameters), VAE and, where the step
differentiates the reward, the aesthetic predictor on CLIP ViT-L/14 (alignjax.diffusion.
full_size) — shapes only, no memory, no weights. The same configs run one real step at a
tiny size in test_{ddpo,draft,adjoint_matching}_sd.py."""

import jax
import numpy as np
import pytest

from alignjax import parallel
from alignjax.diffusion import full_size
from experiments.configs.adjoint_matching import sd15 as am_sd15
from experiments.configs.ddpo import sd15 as ddpo_sd15
from experiments.configs.draft import sd15 as draft_sd15

CASES = [
    ("ddpo", ddpo_sd15, "reward=aesthetic"),
    ("ddpo", ddpo_sd15, "reward=compressibility,finetune=full"),
    ("draft", draft_sd15, "variant=lv"),
    ("draft", draft_sd15, "variant=k10,finetune=full"),
    ("am", am_sd15, "reward=aesthetic"),
]


def shapes(tree):
  return [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,module,arg", CASES)
def test_sd15_step_traces_at_full_size(algorithm, module, arg):
  config = module.get_config(arg)
  step = full_size.step(algorithm, config)
  unet = step.frozen["base"] if algorithm == "am" else None
  if unet is not None:
    assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(unet)) == 859_520_964
  new_state, metrics = step.shapes()[:2]
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(step.state)
  assert shapes(new_state) == shapes(step.state)
  trainable = set(step.state.params)
  if config.finetune.mode == "lora":
    assert trainable and all(("attn1" in k or "attn2" in k) for k in trainable)
  else:
    n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(step.state.params))
    assert n == 859_520_964
  if algorithm == "ddpo":
    assert metrics["loss"].shape == (config.ddpo.num_minibatches,)
  else:
    assert metrics["loss"].shape == ()
  if algorithm == "draft":
    assert metrics["samples"].shape == (config.sampling.batch_size, 64, 64, 4)


def test_unknown_algorithm_names_the_choices():
  with pytest.raises(ValueError, match=r"'ppo'.*\('ddpo', 'draft', 'am'\)"):
    full_size.step("ppo", ddpo_sd15.get_config())


@pytest.mark.slow
def test_placed_step_shards_the_state_over_fsdp_and_the_batch_over_data():
  config = draft_sd15.get_config("variant=1,finetune=full")
  mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1))
  step = full_size.step("draft", config)
  state_sh, frozen_sh, cond_sh, key_sh = step.placed_args(mesh)
  kernels = [
      (x.shape, s.sharding.spec)
      for x, s in zip(
          jax.tree_util.tree_leaves(step.state.params),
          jax.tree_util.tree_leaves(state_sh.params),
      )
      if x.size >= 2**20
  ]
  assert kernels and all("fsdp" in str(spec) for _, spec in kernels), kernels[:3]
  assert cond_sh["text"].sharding.spec[0] == ("data", "fsdp")
  assert key_sh.sharding.spec == jax.sharding.PartitionSpec()
  moments = [x for x in jax.tree_util.tree_leaves(state_sh.opt_state) if x.size >= 2**20]
  assert moments and all("fsdp" in str(x.sharding.spec) for x in moments)
  frozen_kernels = [x for x in jax.tree_util.tree_leaves(frozen_sh) if x.size >= 2**20]
  assert frozen_kernels and all("fsdp" in str(x.sharding.spec) for x in frozen_kernels)
  assert "sharding" in step.lower(mesh).as_text()
