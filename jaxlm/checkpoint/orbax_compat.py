"""The Orbax v1 API, whose import path moved between orbax-checkpoint releases."""

try:  # newer releases
    from orbax.checkpoint import v1 as ocp  # type: ignore[attr-defined]
except ImportError:  # orbax-checkpoint 0.11 - 0.12
    from orbax.checkpoint.experimental import v1 as ocp  # noqa: F401
