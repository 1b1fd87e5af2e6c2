"""Guest images: the Debian image deskpool builds for its desktops, and cloud-init seeds.

Only ``deskpool.domain``, ``deskpool.config`` and the standard library may be imported here.
"""

from deskpool.images.builder import (
    GuestImage,
    ProgressFn,
    build_guest_image,
    load_cached_image,
    sha256_file,
)
from deskpool.images.cloudinit import read_nocloud_seed, write_nocloud_seed
from deskpool.images.recipe import (
    CONSOLE_RECIPE,
    DEFAULT_RECIPE,
    DESKTOP_RECIPE,
    KERNEL_CMDLINE,
    Flavor,
    GuestRecipe,
    recipe_for,
)

__all__ = [
    "CONSOLE_RECIPE",
    "DEFAULT_RECIPE",
    "DESKTOP_RECIPE",
    "KERNEL_CMDLINE",
    "Flavor",
    "GuestImage",
    "GuestRecipe",
    "ProgressFn",
    "build_guest_image",
    "load_cached_image",
    "read_nocloud_seed",
    "recipe_for",
    "sha256_file",
    "write_nocloud_seed",
]
