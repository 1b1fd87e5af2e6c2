"""Rich progress bars for long work."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from deskpool.images.builder import GuestImage, build_guest_image, load_cached_image
from deskpool.images.recipe import Flavor, recipe_for


def build_with_progress(
    console: Console, cache_dir: Path, *, flavor: Flavor = Flavor.CONSOLE, force: bool = False
) -> GuestImage:
    recipe = recipe_for(flavor)
    if not force:
        cached = load_cached_image(cache_dir, recipe)
        if cached is not None:
            return cached
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"building the {flavor} guest image", total=1.0)

        def report(step: str, fraction: float) -> None:
            bar.update(task, description=f"{flavor} guest image: {step}", completed=fraction)

        return build_guest_image(cache_dir, recipe, force=force, progress=report)
