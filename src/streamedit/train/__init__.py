"""Training: the bundled demo edit model (``base``) and the temporal LLLite adapter (``pairs``, ``lllite``)."""
