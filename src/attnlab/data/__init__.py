"""Data: gathering the corpus of Python source, the SentencePiece tokenizer (and its one loader), and the
flat token files with the windows and batches cut from them. Stages: corpus, tokenizer, tokenize.
"""
