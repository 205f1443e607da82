"""eql_d2's config keys. Call ``add_eql_config(cfg)`` on detectron2's default config.

Every key has its default here with a one-line comment; each concern has its own node
and its own ``_add_*_config`` function below.
"""

from detectron2.config import CfgNode as CN  # noqa: F401  (used by the node functions)

__all__ = ["add_eql_config"]


def add_eql_config(cfg):
    """Add every eql_d2 key, with its default, to a detectron2 config (in place)."""
    for add in _NODES:
        add(cfg)


# One function per config node, appended in the order they are defined below.
_NODES = []
