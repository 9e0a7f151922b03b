"""Stable Diffusion components in Flax NNX: the conditional UNet, the KL autoencoder and the
CLIP text and vision encoders, each loading the diffusers / transformers checkpoint layout."""
