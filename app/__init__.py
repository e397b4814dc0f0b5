"""lamina: an HTTP inference microservice for LLaMA-family text generation."""

__version__ = "0.1.0"
