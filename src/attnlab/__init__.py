"""attnlab: train a small transformer from scratch on Python source, then study its attention."""

__version__ = "0.1.0"
