"""Model: the transformer written from scratch (attention with named hook points, MLP, blocks), its
positional encodings, the training objective (loss.py: the tied head and cross-entropy fused), the model file
format and weight snapshots, and the one function that scores a model on tokens (with the unigram baseline),
shared by training and analysis. A new PE variant goes in positional.py.
"""
