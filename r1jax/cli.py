"""`python -m r1jax train|eval|sample`: parse the command line, find the recipe, run it."""
import argparse
import importlib
import pkgutil
import sys


def _recipes() -> list[str]:
    import recipes

    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def _load_recipe(name: str):
    if name not in _recipes():
        raise SystemExit(f"unknown recipe {name!r}; recipes: {', '.join(_recipes()) or '(none yet)'}")
    return importlib.import_module(f"recipes.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m r1jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (("train", "run a recipe's stages"), ("eval", "evaluate a checkpoint or model")):
        p = sub.add_parser(command, help=text, add_help=False)
        p.add_argument("--recipe", default="r1_zero")
        p.add_argument("--preset", default=None, help="the recipe's named preset (default: its CPU default)")
        p.add_argument("-h", "--help", action="store_true", help="list every setting of the recipe")
        if command == "eval":
            p.add_argument("--model", default="", help="an HF folder or checkpoint (default: the run's last policy)")
            p.add_argument("--out", default="", help="the results JSON (default: eval-<model>.json in the run dir)")
        p.add_argument("overrides", nargs="*", help="key=value settings, e.g. rl.group_size=8")
    from r1jax import sample_cli

    sample_cli.add_arguments(sub.add_parser("sample", help="sample completions from a model"))
    args = parser.parse_args(argv)

    if args.command == "sample":
        return sample_cli.run(args)
    from r1jax import run

    recipe = _load_recipe(args.recipe)
    cfg = run.config(recipe, args.preset, args.overrides)
    if args.help:
        from r1jax.config import help_text

        print(f"recipe {args.recipe}; presets: {', '.join(recipe.PRESETS)}\n"
              f"usage: python -m r1jax {args.command} --recipe {args.recipe} [--preset NAME] key=value ...\n")
        print(help_text(cfg))
        return 0
    if args.command == "train":
        return run.train(recipe, cfg)
    return run.evaluate(recipe, cfg, args.model, args.out)
