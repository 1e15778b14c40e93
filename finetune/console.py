"""Console scripts ``meddino-finetune`` and ``meddino-predict`` (``pip install`` puts them on PATH).

Each runs its CLI's ``main`` as ``python finetune/run.py`` / ``python -m finetune.predict`` do: bad input a user
can meet (a missing file, a wrong value) ends with one ``error: ...`` line and exit status 1, never a traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence

USER_ERRORS = (FileNotFoundError, ValueError, KeyError)


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """``main(argv)``; 0 on success, ``error: <message>`` on stderr and 1 for :data:`USER_ERRORS`."""
    try:
        main(argv)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


def finetune(argv: Optional[Sequence[str]] = None) -> int:
    from finetune.run import main

    return run_cli(main, argv)


def predict(argv: Optional[Sequence[str]] = None) -> int:
    from finetune.predict import main

    return run_cli(main, argv)
