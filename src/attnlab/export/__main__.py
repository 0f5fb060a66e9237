"""`python -m attnlab.export models/model.pt --tokenizer data/tokenizer --out models/model_lens.pt` (`make lens`):
check that the TransformerLens model reproduces the trained model's logits, then write its lens file, which
`attnlab.export.load_lens` (or TransformerLens alone) opens in a notebook. A variant TransformerLens cannot express
is refused with one `error: model.<key>: ...` line (exit status 2) before any work; without TransformerLens
installed, the one line says how to install it."""

from __future__ import annotations

import argparse
import sys

from attnlab.core.cli import run_cli
from attnlab.core.errors import AttnlabError
from attnlab.export.lens import max_logit_difference, read_model, save_lens, to_lens

MAX_LOGIT_DIFFERENCE = 1e-4  # fp32 on the CPU; the tests see ~1e-6


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnlab.export", description=__doc__)
    parser.add_argument("model", help="attnlab's model file, models/model.pt")
    parser.add_argument("--out", required=True, help="the lens file to write, e.g. models/model_lens.pt")
    parser.add_argument("--tokenizer", help="data/tokenizer (or its tokenizer.model), stored in the lens file")
    args = parser.parse_args(argv)
    model = read_model(args.model)  # refuses a variant TransformerLens cannot express, before any work
    bridge = to_lens(model, args.tokenizer)
    difference = max_logit_difference(model, bridge)
    if difference > MAX_LOGIT_DIFFERENCE:
        raise AttnlabError(f"the TransformerLens model's logits differ from {args.model}'s by {difference:.2e} "
                           f"(more than {MAX_LOGIT_DIFFERENCE}): nothing written")
    save_lens(args.out, model, args.tokenizer)
    cfg = model.cfg
    print(f"export: wrote {args.out} (TransformerLens, pe={cfg.pe}, {cfg.n_layers} layers x {cfg.n_heads} heads, "
          f"tokenizer {'included' if args.tokenizer else 'not included'}); max |logit difference| {difference:.1e}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
