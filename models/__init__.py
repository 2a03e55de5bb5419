"""phi3v_edge.models: the PyTorch reference (config, checkpoint loading, processor, model). Source of truth.

Import the torch-dependent pieces from their modules (`phi3v_edge.models.modeling`, `.checkpoint`);
this package's top level stays importable without torch.
"""
from .config import ConfigError, Phi3VConfig, VisionConfig  # noqa: F401
