"""The policy names every caller shares: the project's default and SGLang's ``auto``.

A module of its own so that the package's submodules and the modules below the package
(``location``, ``location_files``) can name the default without importing the policies.
"""

from __future__ import annotations

DEFAULT_ALGORITHM = "eplb_plugin"  # what the project plans with unless told otherwise
AUTO = "auto"  # SGLang's name for its own choice between its two recipes (``auto_algorithm``)


def auto_algorithm(num_groups: int | None, num_nodes: int) -> str:
    """The policy SGLang's ``auto`` stands for (its ``compute_algorithm``, 0.5.23):
    ``deepseek_hierarchical`` where the model's expert groups divide over the nodes, else
    ``deepseek``."""
    return "deepseek_hierarchical" if num_groups is not None and num_groups % num_nodes == 0 else "deepseek"
