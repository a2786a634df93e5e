"""spatialvae: a spatial-latent VAE for chest X-rays (see README.md)."""

__version__ = "0.1.0"
