"""Export: a trained attnlab model in the interpretability field's standard toolbox, TransformerLens. lens.py maps
the weights of every variant TransformerLens can express onto its native transformer (same logits, same attention
patterns), refuses the others with one line naming the variant, and reads and writes the lens file a notebook
loads; `python -m attnlab.export` (`make lens`) is its command line. TransformerLens is the optional extra `lens`
(pip install -e ".[lens]"), imported only when a function here needs it, so the default install never does.
"""

from attnlab.export.lens import check_exportable, load_lens, save_lens, to_lens

__all__ = ["check_exportable", "load_lens", "save_lens", "to_lens"]
