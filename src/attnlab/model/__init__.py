"""Model: the transformer written from scratch (attention with named hook points, MLP, blocks), its
positional encodings, and the model file format. A new PE variant goes in positional.py.
"""
