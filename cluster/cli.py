"""The one way a job starts: parse config, print it, run, turn bad input into one line."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence, TypeVar

from cluster.config import BaseConfig, dump_config, parse_args
from ops.errors import UserError

C = TypeVar("C", bound=BaseConfig)


def run_job(main: Callable[[C], object], model: type[C], prog: str, description: str,
            argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` into ``model``, print the resolved config and call ``main(cfg)``.

    A :class:`UserError` anywhere (bad key, bad value, missing file, unknown model) exits 2 with a
    single ``error: ...`` line and no traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_args(model, argv, prog=prog, description=description)
        print(f"[{prog}] resolved config:\n" + "\n".join("  " + line for line in dump_config(cfg).splitlines()),
              flush=True)
        main(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"[{prog}] interrupted", file=sys.stderr)
        raise SystemExit(130) from None
