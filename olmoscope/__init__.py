"""olmoscope: look inside AllenAI's OLMo 2 models and run them with a runtime of our own."""

__version__ = "0.1.0"
