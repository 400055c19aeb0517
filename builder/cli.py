"""`build-neuron-dataset`: thin typer commands over the stages. Heavy imports happen lazily."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from builder.errors import BuilderError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Build a validated Hugging Face dataset of a vision-language model's neurons.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=True)],
        force=True,
    )
    from builder.quiet import quiet_libraries

    quiet_libraries()
    for noisy in ("httpx", "datasets", "transformers", "huggingface_hub", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(e: Exception) -> typer.Exit:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


@app.callback(invoke_without_command=True)
def build(
    ctx: typer.Context,
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Bundled recipe name or YAML path.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: runs/<recipe name>).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a recipe key: dotted.key=value.")] = [],
    force: Annotated[list[str], typer.Option(help="Redo this stage and every stage after it.")] = [],
    until: Annotated[Optional[str], typer.Option(help="Stop after this stage.")] = None,
    push_to_hub: Annotated[
        Optional[str], typer.Option(help="Publish the dataset to this Hub repo (org/name) at the end.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging (each request, resume points).")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (stages, samples, neurons, batches, GPU time, API "
                           "tokens and dollars) and check the inputs, without loading weights or sending anything.")
    ] = False,
) -> None:
    """Run every stage of RECIPE into the run directory; the dataset lands in OUT/dataset."""
    if ctx.invoked_subcommand:
        return
    if recipe is None:
        err.print(ctx.get_help())
        raise _fail(BuilderError("--recipe is required (try `build-neuron-dataset recipes`)"))
    _setup_logging(verbose)
    try:
        from builder.config import load_recipe
        from builder.pipeline import default_stages
        from builder.run import Executor

        if push_to_hub is not None:
            set_ = [*set_, f"publish.repo={push_to_hub}"]  # the card's load snippet names the repo
        resolved = load_recipe(recipe, set_)
        run_dir = out or Path("runs") / resolved.recipe.name
        executor = Executor(resolved, run_dir, default_stages())
        if dry_run:
            _print_plan(executor)
            return
        outcomes = executor.run(force=force, until=until)
    except BuilderError as e:
        raise _fail(e) from e
    ran = [o.name for o in outcomes if o.ran]
    err.print(
        f"[green]done[/]: {run_dir} ({'ran ' + ', '.join(ran) if ran else 'every stage up to date'})",
        highlight=False,
    )
    if push_to_hub is not None:
        publish(run_dir / "dataset", repo=push_to_hub, version=None, private=resolved.publish.private)


def _print_plan(executor) -> None:
    """The offline build plan; the exact explain plan too once the exemplars are up to date."""
    from builder.plan import make_plan

    status = executor.up_to_date()
    stages = [f"{name}{' (up to date)' if done else ''}" for name, done in status.items()]
    plan = make_plan(executor.recipe, stages)
    typer.echo(plan.render())
    if status.get("exemplars"):
        from builder.explain.plan import plan_explain

        typer.echo(plan_explain(executor.ctx).render())
    elif "exemplars" in status:
        typer.echo("(explain: an upper bound from the recipe; run with --until exemplars, then --dry-run again, "
                   "for the exact requests)")
    if plan.problems:
        raise _fail(BuilderError("; ".join(plan.problems)))


@app.command("recipes")
def recipes() -> None:
    """List the bundled recipes."""
    from builder.config import list_recipes

    for name, description in list_recipes().items():
        typer.echo(f"{name:<14} {description}")


@app.command("validate")
def validate(path: Annotated[Path, typer.Argument(help="A dataset folder (RUN_DIR/dataset) or a run directory.")]) -> None:
    """Check a dataset folder; exit 1 on any failure."""
    from validation import validate_dataset

    report = validate_dataset(path)
    typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("publish")
def publish_command(
    path: Annotated[Path, typer.Argument(help="A dataset folder (RUN_DIR/dataset) or a run directory.")],
    repo: Annotated[
        Optional[str], typer.Option(help="Hub dataset repo ORG/NAME (default: the recipe's publish.repo).")
    ] = None,
    version: Annotated[
        Optional[str], typer.Option(help="Version to tag as vX.Y.Z (default and must match: package.version).")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging (each request, resume points).")] = False,
) -> None:
    """Validate a dataset folder, upload it to the Hub as one commit and tag it vX.Y.Z."""
    _setup_logging(verbose)
    from builder.publish import publish_settings
    from validation import resolve_dataset_dir

    built_for = publish_settings(resolve_dataset_dir(path))
    repo = repo or built_for.get("repo")
    if not repo:
        raise _fail(BuilderError("--repo ORG/NAME is required (the recipe sets no publish.repo)"))
    if repo != built_for.get("repo") and (path / "manifest.json").is_file():
        _repackage_for(path, repo)
    publish(path, repo=repo, version=version, private=private or bool(built_for.get("private")))


def _repackage_for(run_dir: Path, repo: str) -> None:
    """Package a finished run again for `repo` (its card names the repo): the recipe the run
    was built with, `publish.repo` changed; every stage before package is up to date."""
    from builder.config import recipe_from_dict
    from builder.pipeline import default_stages
    from builder.run import Executor, Manifest

    try:
        data = Manifest.load(run_dir / "manifest.json").recipe
        recipe = recipe_from_dict({**data, "publish": {**data.get("publish", {}), "repo": repo}})
        executor = Executor(recipe, run_dir, default_stages())
        unfinished = [name for name, done in executor.up_to_date().items()
                      if not done and name not in ("package", "validate")]
        if unfinished:
            raise BuilderError(f"{run_dir}: stage {unfinished[0]} is not up to date; finish the build first")
        executor.run(until="validate")
    except BuilderError as e:
        raise _fail(e) from e
    err.print(f"repackaged {run_dir} for {repo}", highlight=False)


def publish(path: Path, repo: str, version: Optional[str], private: bool) -> None:
    """Validate, then upload the dataset folder as one Hub commit and tag it."""
    from builder.publish import publish_dataset

    try:
        result = publish_dataset(path, repo=repo, version=version, private=private)
    except BuilderError as e:
        raise _fail(e) from e
    typer.echo(result.summary())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
