"""``jaxlm train --config experiments/NAME.py --workdir DIR [--set key=value ...]``.

Running the same command on the same workdir resumes from its last checkpoint.
"""

import sys

from jaxlm import distributed
from jaxlm.cli_util import quiet_runtime_logs, user_errors
from jaxlm.train.config import load_experiment
from jaxlm.train.trainer import train


def build_parser(parser):
    parser.add_argument("--config", required=True, help="experiment file with a config() function")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tensorboard, final/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set steps=40 --set optimizer.learning_rate=1e-4")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed data line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    with user_errors():
        distributed.initialize()
        overrides = list(args.overrides) + (["strict=true"] if args.strict else [])
        cfg = load_experiment(args.config, overrides)
        log = lambda m: print(m, file=sys.stderr, flush=True)
        result = train(cfg, args.workdir, progress=not args.no_progress, log=log)
    steps, losses = zip(*result["losses"]) if result["losses"] else ((), ())
    if losses:
        print(f"trained steps {steps[0]}..{steps[-1]}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"final model: {result['final']}")
    return 0
