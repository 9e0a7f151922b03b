"""CLIP's text encoder (Stable Diffusion's conditioning) and vision tower, in Flax NNX.

Mirrors transformers' `CLIPTextModel` and `CLIPVisionModelWithProjection` (parameter paths
follow transformers' module names, so `alignjax.models.convert.clip_keys` is a plain table).
Shapes: B batch, T tokens, H hidden, N heads, D = H / N head size, F MLP width, P patch size.

    LayerNorm:  y = (x - mean x) / sqrt(var x + eps) * w + b   (float32 statistics)  (eq. 1)
    Attention:  a = softmax(q k^T / sqrt(D) + m) v,  m_ts = 0 where key s is allowed, else
                -inf; text: allowed iff s <= t (causal) and attention_mask[s] = 1     (eq. 2)
    MLP:        fc2(act(fc1 x)),  act of `hidden_act` (clip_config eqs. 1-3)          (eq. 3)
    Layer:      x <- x + attn(LN1 x);   x <- x + mlp(LN2 x)                          (eq. 4)
    Text:       h_0 = E_tok[ids] + E_pos[0..T-1];  h_l = layer_l(h_{l-1});
                last_hidden_state = final_layer_norm(h_L)                           (eq. 5)
    Pooling:    pooled[b] = last_hidden_state[b, i_b],
                i_b = argmax_t ids[b, t]               if eos_token_id == 2 (old configs)
                i_b = first t with ids[b, t] == eos    otherwise                    (eq. 6)
    Vision:     h_0 = [c; conv_P(pixels)] + E_pos;  h_0 <- pre_layrnorm(h_0);
                image_embeds = W_proj post_layernorm(h_L[:, 0])                     (eq. 7)

Eq. 6 is transformers' rule: configs written before transformers PR #24773 (SD 1.x and 2.x
text encoders among them) carry eos_token_id = 2, and then the end-of-text token is found as
the largest id (49407 is the largest id of CLIP's vocabulary). A sequence with no eos token
pools position 0 under the second rule (argmax of all zeros), as transformers does.

`hidden_states` (with `output_hidden_states=True`) is (h_0, ..., h_L): the embeddings and each
layer's output before final_layer_norm, as transformers returns them; `text_embeddings` is what
diffusers' `StableDiffusionPipeline.encode_prompt` feeds the UNet (eq. 8). SD 2.x's text
encoder checkpoint already stores OpenCLIP-H's 24-layer tower without its last layer (23
layers), so its `last_hidden_state` is OpenCLIP's penultimate layer with no clip_skip.

Padding: with right padding (CLIP's tokenizer) every query keeps at least itself allowed. A
query with no allowed key (left padding's first rows) attends uniformly, as XLA's attention
does; its output is not meaningful in either library.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignjax.models.sd.attention import attention, merge_heads, split_heads
from alignjax.models.sd.clip_config import ACTIVATIONS, CLIPTextConfig, CLIPVisionConfig

# CLIPImageProcessor's normalisation (OpenAI CLIP's training statistics), RGB.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ACT = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
assert tuple(_ACT) == ACTIVATIONS


def activation(name: str):
  """The activation function of `hidden_act` name (clip_config eqs. 1-3)."""
  if name not in _ACT:
    raise ValueError(f"hidden_act={name!r}: must be one of {ACTIVATIONS}")
  return _ACT[name]


class LayerNorm(nnx.Module):
  """Eq. 1 over the last axis, statistics in float32 (as torch's LayerNorm in half precision)."""

  def __init__(self, size: int, *, eps: float, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((size,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((size,), param_dtype))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def _normal(key, shape, dtype, stddev: float = 0.02):
  n = 1
  for d in shape:
    n *= d
  return (stddev * jax.random.normal(key, (n,), jnp.float32)).reshape(shape).astype(dtype)


# The modules take PRNG keys rather than `nnx.Rngs`: one `Rngs` draw per layer, split here,
# keeps `nnx.eval_shape` of a full-size tower fast (each `Rngs` draw under a trace costs time
# that grows with the trace).
class Linear(nnx.Module):
  """y = x kernel (+ bias), kernel [in, out] (transformers' nn.Linear, transposed)."""

  def __init__(self, n_in: int, n_out: int, *, key, bias: bool = True, dtype, param_dtype):
    self.kernel = nnx.Param(_normal(key, (n_in, n_out), param_dtype))
    self.bias = nnx.Param(jnp.zeros((n_out,), param_dtype)) if bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Embed(nnx.Module):
  """Rows of embedding [V, H] (nn.Embedding)."""

  def __init__(self, n: int, size: int, *, key, dtype, param_dtype):
    self.embedding = nnx.Param(_normal(key, (n, size), param_dtype))
    self.dtype = dtype

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class SelfAttention(nnx.Module):
  """Multi-head self-attention (eq. 2) through `alignjax.models.sd.attention.attention`."""

  def __init__(self, c, *, key, dtype, param_dtype):
    h = c.hidden_size
    kq, kk, kv, ko = jax.random.split(key, 4)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.q_proj, self.k_proj = Linear(h, h, key=kq, **kw), Linear(h, h, key=kk, **kw)
    self.v_proj, self.out_proj = Linear(h, h, key=kv, **kw), Linear(h, h, key=ko, **kw)
    self.num_heads, self.scale = c.num_attention_heads, c.head_dim**-0.5

  def __call__(self, x, *, causal: bool, mask=None):
    q, k, v = (split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
    out = attention(q, k, v, causal=causal, mask=mask, scale=self.scale)
    return self.out_proj(merge_heads(out))


class MLP(nnx.Module):
  """fc2(act(fc1 x)) (eq. 3)."""

  def __init__(self, c, *, key, dtype, param_dtype):
    k1, k2 = jax.random.split(key)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Linear(c.hidden_size, c.intermediate_size, key=k1, **kw)
    self.fc2 = Linear(c.intermediate_size, c.hidden_size, key=k2, **kw)
    self.act = c.hidden_act

  def __call__(self, x):
    return self.fc2(activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-norm residual block (eq. 4)."""

  def __init__(self, c, *, key, dtype, param_dtype):
    ka, km = jax.random.split(key)
    self.layer_norm1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, param_dtype=param_dtype)
    self.self_attn = SelfAttention(c, key=ka, dtype=dtype, param_dtype=param_dtype)
    self.layer_norm2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(c, key=km, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, *, causal: bool, mask=None):
    x = x + self.self_attn(self.layer_norm1(x), causal=causal, mask=mask)
    return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):

  def __init__(self, c, *, key, dtype, param_dtype):
    keys = jax.random.split(key, c.num_hidden_layers)
    self.layers = nnx.List(
        [EncoderLayer(c, key=k, dtype=dtype, param_dtype=param_dtype) for k in keys]
    )

  def __call__(self, x, *, causal: bool, mask=None) -> list:
    """(h_0, ..., h_L) of eqs. 5 / 7."""
    hidden = [x]
    for layer in self.layers:
      x = layer(x, causal=causal, mask=mask)
      hidden.append(x)
    return hidden


class TextEmbeddings(nnx.Module):

  def __init__(self, c: CLIPTextConfig, *, key, dtype, param_dtype):
    k1, k2 = jax.random.split(key)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.token_embedding = Embed(c.vocab_size, c.hidden_size, key=k1, **kw)
    self.position_embedding = Embed(c.max_position_embeddings, c.hidden_size, key=k2, **kw)

  def __call__(self, input_ids):
    t = input_ids.shape[-1]
    return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t)[None])


class CLIPTextOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, T, H], after final_layer_norm
  pooler_output: jax.Array  # [B, H] (eq. 6)
  hidden_states: tuple | None = None  # (h_0, ..., h_L), each [B, T, H], before the final norm


def pooled_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[B] position each sequence pools (eq. 6, transformers' rule)."""
  ids = jnp.asarray(input_ids).astype(jnp.int32)
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(nnx.Module):
  """transformers' CLIPTextModel: `__call__(input_ids [B, T], attention_mask [B, T] | None)`.

  dtype: activation dtype; param_dtype: storage dtype of the parameters. Token ids are ints;
  attention_mask is 1 (or True) for real tokens. T <= max_position_embeddings.
  """

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.config = config
    ke, kl = jax.random.split(rngs.params())
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embeddings = TextEmbeddings(config, key=ke, **kw)
    self.encoder = Encoder(config, key=kl, **kw)
    self.final_layer_norm = LayerNorm(
        config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype
    )

  def __call__(
      self, input_ids, attention_mask=None, *, output_hidden_states: bool = False
  ) -> CLIPTextOutput:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"CLIPTextModel: input_ids must be [B, T], got shape {input_ids.shape}")
    b, t = input_ids.shape
    if t > self.config.max_position_embeddings:
      raise ValueError(
          f"CLIPTextModel: sequence length {t} exceeds max_position_embeddings="
          f"{self.config.max_position_embeddings}"
      )
    mask = None
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
      if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"CLIPTextModel: attention_mask shape {attention_mask.shape} != input_ids shape "
            f"{input_ids.shape}"
        )
      mask = attention_mask.astype(bool)[:, None, None, :]  # keys [B, 1, 1, S]
    hidden = self.encoder(self.embeddings(input_ids), causal=True, mask=mask)
    last = self.final_layer_norm(hidden[-1])
    pooled = last[jnp.arange(b), pooled_index(input_ids, self.config.eos_token_id)]
    return CLIPTextOutput(last, pooled, tuple(hidden) if output_hidden_states else None)


def text_embeddings(
    model: CLIPTextModel, input_ids, *, clip_skip: int | None = None, attention_mask=None
) -> jax.Array:
  """[B, T, H] prompt embeddings as diffusers' `StableDiffusionPipeline.encode_prompt` makes
  them (attention_mask only for text encoders whose config sets `use_attention_mask`):

      clip_skip None:  last_hidden_state = final_layer_norm(h_L)
      clip_skip k:     final_layer_norm(h_{L-k})   (= hidden_states[-(k + 1)])       (eq. 8)
  """
  if clip_skip is None:
    return model(input_ids, attention_mask).last_hidden_state
  n = model.config.num_hidden_layers
  if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < n:
    raise ValueError(f"clip_skip={clip_skip!r}: must be None or an integer in [0, {n})")
  out = model(input_ids, attention_mask, output_hidden_states=True)
  return model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


class PatchConv(nnx.Module):
  """P x P convolution with stride P and no bias, kernel [P, P, C, H] (nn.Conv2d, NHWC)."""

  def __init__(self, p: int, n_in: int, n_out: int, *, key, dtype, param_dtype):
    self.kernel = nnx.Param(_normal(key, (p, p, n_in, n_out), param_dtype))
    self.p, self.dtype = p, dtype

  def __call__(self, x):
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        self.kernel[...].astype(self.dtype),
        (self.p, self.p),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class VisionEmbeddings(nnx.Module):
  """[c; conv_P(pixels)] + E_pos (eq. 7); the patch conv has no bias."""

  def __init__(self, c: CLIPVisionConfig, *, key, dtype, param_dtype):
    kc, kp, ke = jax.random.split(key, 3)
    self.class_embedding = nnx.Param(_normal(kc, (c.hidden_size,), param_dtype))
    p = c.patch_size
    self.patch_embedding = PatchConv(
        p, c.num_channels, c.hidden_size, key=kp, dtype=dtype, param_dtype=param_dtype
    )
    self.position_embedding = Embed(
        c.num_positions, c.hidden_size, key=ke, dtype=dtype, param_dtype=param_dtype
    )
    self.dtype = dtype

  def __call__(self, pixel_values):
    b = pixel_values.shape[0]
    patches = self.patch_embedding(pixel_values.astype(self.dtype))  # [B, g, g, H]
    patches = patches.reshape(b, -1, patches.shape[-1])  # row-major, as torch's flatten(2)
    cls = jnp.broadcast_to(
        self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1])
    )
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPVisionOutput(NamedTuple):
  image_embeds: jax.Array  # [B, projection_dim] (eq. 7)
  last_hidden_state: jax.Array  # [B, 1 + g^2, H], h_L (no post_layernorm)
  pooler_output: jax.Array  # [B, H], post_layernorm(h_L[:, 0])
  hidden_states: tuple | None = None  # (h_0 after pre_layrnorm, ..., h_L)


class CLIPVisionModelWithProjection(nnx.Module):
  """transformers' CLIPVisionModelWithProjection on NHWC pixels [B, S, S, C] (S = image_size),
  already normalised (`normalize_images`)."""

  def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
    self.config = config
    ke, kl, kp = jax.random.split(rngs.params(), 3)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    h, eps = config.hidden_size, config.layer_norm_eps
    self.embeddings = VisionEmbeddings(config, key=ke, **kw)
    self.pre_layrnorm = LayerNorm(h, eps=eps, param_dtype=param_dtype)  # transformers' spelling
    self.encoder = Encoder(config, key=kl, **kw)
    self.post_layernorm = LayerNorm(h, eps=eps, param_dtype=param_dtype)
    self.visual_projection = Linear(h, config.projection_dim, key=kp, bias=False, **kw)

  def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
    c = self.config
    pixel_values = jnp.asarray(pixel_values)
    want = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != want:
      raise ValueError(
          f"CLIPVisionModelWithProjection: pixel_values must be NHWC [B, {want[0]}, {want[1]}, "
          f"{want[2]}], got shape {pixel_values.shape}"
      )
    x = self.pre_layrnorm(self.embeddings(pixel_values))
    hidden = self.encoder(x, causal=False)
    pooled = self.post_layernorm(hidden[-1][:, 0])
    return CLIPVisionOutput(
        self.visual_projection(pooled),
        hidden[-1],
        pooled,
        tuple(hidden) if output_hidden_states else None,
    )


def normalize_images(images, size: int) -> jax.Array:
  """Images [B, H, W, 3] with values in [0, 1] -> CLIP's input [B, size, size, 3]:

  resize the shorter side to `size` (bicubic, aspect ratio kept), centre-crop size x size, then
  (x - CLIP_MEAN) / CLIP_STD per channel, as `CLIPImageProcessor` does. The resize is
  `jax.image.resize(method="bicubic")` (antialiased when shrinking), which differs slightly
  from the PIL bicubic resample CLIPImageProcessor uses, so embeddings of the same image differ
  a little from transformers' pipeline (differentiable, for reward gradients).
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"normalize_images: expected [B, H, W, 3], got shape {images.shape}")
  b, h, w, _ = images.shape
  if (h, w) != (size, size):
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    images = jax.image.resize(images.astype(jnp.float32), (b, nh, nw, 3), method="bicubic")
    top, left = (nh - size) // 2, (nw - size) // 2
    images = images[:, top : top + size, left : left + size]
  mean = np.asarray(CLIP_MEAN, np.float32)
  std = np.asarray(CLIP_STD, np.float32)
  return (images.astype(jnp.float32) - mean) / std
