"""Integrations with other libraries, each imported on first use (their dependencies are optional).

* :mod:`attnkit.integrations.transformers`: ``attn_implementation="attnkit"`` for Hugging Face transformers
  (``pip install 'attnkit[hf]'``).
"""
