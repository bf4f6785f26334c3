"""The fused DreamBooth loss op family: add_noise and diffusion_loss."""
from .op import add_noise, diffusion_loss
from .reference import seeded_noise

__all__ = ["add_noise", "diffusion_loss", "seeded_noise"]
