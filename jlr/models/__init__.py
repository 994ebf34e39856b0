"""Small reference models to compress with jlr (loaded lazily as ``jlr.models``).

* :mod:`jlr.models.bert` -- a linen BERT encoder with sentence-embedding pooling and a
  loader for Hugging Face BERT safetensors (e.g. sentence-transformers all-MiniLM-L6-v2).
"""

from jlr.models import bert

__all__ = ["bert"]
