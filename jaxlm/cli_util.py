"""Shared behaviour of jaxlm's command-line entry points.

User errors print one line to stderr and exit 1, with no traceback; bugs in
jaxlm still raise normally so they can be reported.
"""

from __future__ import annotations

import contextlib
import os
import sys

from jaxlm.errors import JaxlmError


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def one_line_usage_errors(parser):
    """Makes argparse's usage errors one line on stderr (``error: ...``, exit 2), like jaxlm's other
    errors, instead of its usage line plus the message."""
    def error(message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error
    return parser


def quiet_runtime_logs() -> None:
    """Keeps absl/TensorStore INFO chatter off the terminal of CLI users."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.WARNING)
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore", module="orbax")
