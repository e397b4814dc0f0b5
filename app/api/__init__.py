"""The HTTP layer: OpenAI- and TGI-compatible routes over the engine. Never imports torch."""
