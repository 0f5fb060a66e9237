"""`python -m attnlab.config [params.yaml]`: validate a params file and print what it implies (parameter
count, token budget, steps, tokens per epoch), or one `error: key: message` line and exit status 2.

The schema itself lives in attnlab.core.params."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from attnlab.core.params import Params, load_params, params_to_dict

# ----------------------------------------------------------------------------------------------- the CLI


def describe(params: Params, tokens_meta: Path | None = Path("data/tokens/meta.json")) -> dict:
    """What the config implies: parameter count, token budget (whole steps, as training runs it), tokens per
    epoch when known."""
    from attnlab.training.schedule import make_budget

    budget = make_budget(params, params.tokenizer.vocab_size)
    implied = {
        "n_params": budget.n_params,
        "d_head": params.model.d_head,
        "train_tokens_budget": budget.total_tokens,
        "budget_source": "train.max_tokens" if params.train.max_tokens else "train.tokens_per_param",
        "tokens_per_param": round(budget.total_tokens / budget.n_params, 3),
        "tokens_per_step": budget.tokens_per_step,
        "steps": budget.steps,
        "warmup_steps": budget.warmup_steps,
    }
    if tokens_meta is not None and tokens_meta.exists():
        meta = json.loads(tokens_meta.read_text())
        implied["tokens_per_epoch"] = meta["train"]["tokens"]
        implied["epochs"] = round(budget.total_tokens / max(1, meta["train"]["tokens"]), 3)
    else:
        implied["tokens_per_epoch"] = "unknown until the tokenize stage has run"
    return implied


def main(argv: list[str] | None = None) -> int:
    from attnlab.core.cli import run_cli

    def _run(args: list[str]) -> None:
        path = args[0] if args else "params.yaml"
        params = load_params(path)
        print(yaml.safe_dump({"params": params_to_dict(params), "implied": describe(params)}, sort_keys=False))

    return run_cli(_run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    # Under `python -m attnlab.config` this file is `__main__`, whose ConfigError is not the class cli.run_cli
    # catches (that one lives in the module `attnlab.config`), so run the main of the importable module.
    from attnlab.config import main as _main

    sys.exit(_main())
