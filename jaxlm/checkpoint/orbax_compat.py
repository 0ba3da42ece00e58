"""The Orbax v1 API, whose import path and names moved between releases."""

try:  # newer releases
    from orbax.checkpoint import v1 as ocp  # type: ignore[attr-defined]
except ImportError:  # orbax-checkpoint 0.11 - 0.12
    from orbax.checkpoint.experimental import v1 as ocp  # noqa: F401

# `load`/`metadata` replaced `load_pytree`/`pytree_metadata` (deprecated in 0.12).
_NEW_NAMES = hasattr(ocp, "load") and hasattr(ocp, "metadata")


def load_tree(path, abstract):
    return ocp.load(path, abstract) if _NEW_NAMES else ocp.load_pytree(path, abstract)


def tree_metadata(path):
    meta = ocp.metadata(path) if _NEW_NAMES else ocp.pytree_metadata(path)
    return meta.metadata
