#!/usr/bin/env python3
"""The cluster recipes of slurm/recipes.yaml: read, expand, and turn into sbatch scripts.

    recipe.py NAME              train.py's overrides for recipe NAME, one per line, with ${VAR} and
                                ${VAR:-default} filled in from the environment (slurm/train.sbatch
                                reads this when the job starts)
    recipe.py NAME --sbatch     the recipe's sbatch options, one per line
    recipe.py NAME --command    the train.py command line, shell-quoted (to run it under torchrun
                                yourself, without SLURM)
    recipe.py --list            the recipes, their resources and what they do
    recipe.py --write           (re)write slurm/<name>.sbatch for every recipe
    recipe.py --check           exit 1 if a slurm/<name>.sbatch differs from what --write writes

Needs PyYAML (in the project's venv). Bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

HERE = Path(__file__).resolve().parent
TABLE = HERE / "recipes.yaml"
GENERATED = ("# Generated from slurm/recipes.yaml by `.venv/bin/python slurm/recipe.py --write`: "
             "edit the recipe, not this file.")
_VAR = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_RECIPE_KEYS = {"about", "nodes", "gpus_per_node", "time", "overrides", "data", "sbatch"}


class RecipeError(ValueError):
    """A problem with the table or with what was asked for: one line, exit code 2."""


def expand(text: str, env: Mapping[str, str], where: str = "") -> str:
    """``${NAME}`` / ``${NAME:-default}`` (upper-case NAME) from ``env``, as bash does; the rest is
    left alone (Hydra's own ``${a.b}`` interpolations are lower case)."""

    def one(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name, "")
        if value:
            return value
        if default is None:
            raise RecipeError(f"{where or text}: needs {name} in the environment (export {name}=... before sbatch)")
        return default

    return _VAR.sub(one, text)


@dataclass
class Recipe:
    name: str
    about: str
    nodes: int
    gpus_per_node: int
    time: str
    base: list[str]
    data: list[str] | dict[str, list[str]]
    common: dict[str, Any] = field(default_factory=dict)
    sbatch_extra: dict[str, Any] = field(default_factory=dict)

    def data_overrides(self, env: Mapping[str, str]) -> list[str]:
        if isinstance(self.data, list):
            return list(self.data)
        for var, overrides in self.data.items():
            if var != "default" and env.get(var):
                return list(overrides)
        if "default" not in self.data:
            names = " or ".join(f"{v}=..." for v in self.data)
            raise RecipeError(f"recipe {self.name}: set {names} before sbatch (RPJ_DIR: a local copy of "
                              "RedPajama-Data-1T-Sample, see conf/data/redpajama_local.yaml; RPJ_STREAM=1: stream it)")
        return list(self.data["default"])

    def overrides(self, env: Mapping[str, str] | None = None) -> list[str]:
        """train.py's Hydra overrides, environment variables filled in."""
        env = os.environ if env is None else env
        return [expand(o, env, f"recipe {self.name}: {o}") for o in [*self.base, *self.data_overrides(env)]]

    def sbatch_options(self) -> dict[str, Any]:
        """sbatch option -> value (True = a flag without value), in header order."""
        opts: dict[str, Any] = {"job-name": self.name, "nodes": self.nodes, "gpus-per-node": self.gpus_per_node,
                                "time": self.time}
        opts.update(self.common)
        opts.update(self.sbatch_extra)
        return opts

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def option_lines(opts: Mapping[str, Any]) -> list[str]:
    return [f"--{k}" if v is True else f"--{k}={v}" for k, v in opts.items() if v is not False and v is not None]


def _list_of_str(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v and "\n" not in v for v in value):
        raise RecipeError(f"{where} must be a list of one-line strings")
    return list(value)


def load(path: Path = TABLE) -> dict[str, Recipe]:
    import yaml

    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("recipes"), dict):
        raise RecipeError(f"{path}: needs a `recipes:` mapping")
    unknown = sorted(k for k in raw if k not in ("recipes", "common") and not str(k).startswith("_"))
    if unknown:
        raise RecipeError(f"{path}: unknown top-level keys {unknown} (anchors for reuse start with _)")
    common = dict(raw.get("common") or {})
    recipes = {}
    for name, r in raw["recipes"].items():
        where = f"{path.name}: recipe {name}"
        if not _NAME.match(str(name)):
            raise RecipeError(f"{where}: a recipe name is lower case letters, digits and _")
        required = {"nodes", "gpus_per_node", "time", "overrides", "data"}
        if not isinstance(r, dict) or set(r) - _RECIPE_KEYS or not required <= set(r):
            raise RecipeError(f"{where}: needs nodes, gpus_per_node, time, overrides, data (and may have about, "
                              f"sbatch); got {sorted(r) if isinstance(r, dict) else r!r}")
        data = r["data"]
        if isinstance(data, dict):
            if not data:
                raise RecipeError(f"{where}: data as a mapping needs at least one ENV_VAR: [overrides] entry")
            data = {str(k): _list_of_str(v, f"{where}: data.{k}") for k, v in data.items()}
        else:
            data = _list_of_str(data, f"{where}: data")
        recipes[name] = Recipe(name=name, about=str(r.get("about", "")), nodes=int(r["nodes"]),
                               gpus_per_node=int(r["gpus_per_node"]), time=str(r["time"]),
                               base=_list_of_str(r["overrides"], f"{where}: overrides"), data=data, common=common,
                               sbatch_extra=dict(r.get("sbatch") or {}))
    return recipes


def get(name: str, recipes: Mapping[str, Recipe] | None = None) -> Recipe:
    recipes = load() if recipes is None else recipes
    if name not in recipes:
        raise RecipeError(f"no recipe {name!r} in slurm/recipes.yaml; choose one of: {', '.join(recipes)}")
    return recipes[name]


def wrapper_text(recipe: Recipe) -> str:
    """slurm/<name>.sbatch: the recipe's resources as #SBATCH lines, then slurm/train.sbatch."""
    lines = [
        "#!/usr/bin/env bash",
        f"# {recipe.name}: {recipe.about}",
        GENERATED,
        f"# Submit from the repository root:  sbatch slurm/{recipe.name}.sbatch [more train.py overrides]",
        *(f"#SBATCH {o}" for o in option_lines(recipe.sbatch_options())),
        f'cd "${{SLURM_SUBMIT_DIR:-.}}" && exec bash slurm/train.sbatch {recipe.name} "$@"',
    ]
    return "\n".join(lines) + "\n"


def stale_wrappers(recipes: Mapping[str, Recipe], folder: Path = HERE) -> list[Path]:
    """Generated scripts in ``folder`` whose recipe is gone."""
    out = []
    for p in sorted(folder.glob("*.sbatch")):
        if p.stem not in recipes and GENERATED in p.read_text():
            out.append(p)
    return out


def write(recipes: Mapping[str, Recipe], folder: Path = HERE) -> list[Path]:
    changed = []
    for r in recipes.values():
        p = folder / f"{r.name}.sbatch"
        text = wrapper_text(r)
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
            changed.append(p)
    for p in stale_wrappers(recipes, folder):
        p.unlink()
        changed.append(p)
    return changed


def check(recipes: Mapping[str, Recipe], folder: Path = HERE) -> list[str]:
    problems = []
    for r in recipes.values():
        p = folder / f"{r.name}.sbatch"
        if not p.exists() or p.read_text() != wrapper_text(r):
            problems.append(f"{p.name} is missing or differs from recipe {r.name}")
    problems += [f"{p.name} was generated for a recipe that is gone" for p in stale_wrappers(recipes, folder)]
    return problems


def allocation_warning(recipe: Recipe, env: Mapping[str, str]) -> str | None:
    """The job's allocation differs from the recipe's (then rows per optimizer step differ too)."""
    nodes, gpus = env.get("SLURM_NNODES"), env.get("SLURM_GPUS_ON_NODE")
    got = []
    if nodes and nodes.isdigit() and int(nodes) != recipe.nodes:
        got.append(f"{nodes} nodes")
    if gpus and gpus.isdigit() and int(gpus) != recipe.gpus_per_node:
        got.append(f"{gpus} GPUs per node")
    if not got:
        return None
    return (f"warning: recipe {recipe.name} is written for {recipe.nodes} nodes x {recipe.gpus_per_node} GPUs, "
            f"this job has {' and '.join(got)}: the global batch (rows per optimizer step) changes with the GPU count")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="slurm/recipe.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--sbatch", action="store_true", help="the recipe's sbatch options")
    ap.add_argument("--command", action="store_true", help="the train.py command line, shell-quoted")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    try:
        recipes = load()
        if args.list:
            for r in recipes.values():
                print(f"{r.name:28s} {r.nodes} x {r.gpus_per_node} GPUs, {r.time:>9s}  {r.about}")
            return 0
        if args.write:
            for p in write(recipes):
                print(f"wrote {p.relative_to(HERE.parent)}" if p.exists() else f"removed {p.relative_to(HERE.parent)}")
            return 0
        if args.check:
            problems = check(recipes)
            for line in problems:
                print(f"slurm/{line}; run .venv/bin/python slurm/recipe.py --write", file=sys.stderr)
            return 1 if problems else 0
        if not args.name:
            ap.error("name a recipe (or --list)")
        recipe = get(args.name, recipes)
        if args.sbatch:
            print("\n".join(option_lines(recipe.sbatch_options())))
        elif args.command:
            print(shlex.join(["train.py", *recipe.overrides()]))
        else:
            warning = allocation_warning(recipe, os.environ)
            if warning:
                print(warning, file=sys.stderr)
            print("\n".join(recipe.overrides()))
        return 0
    except RecipeError as e:
        print(f"slurm/recipe.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
