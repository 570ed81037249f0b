"""``python -m layerscope.trainer train ...`` — the trainer command line without the console
script; the server's launcher starts built-in runs this way. Never does anything on import
beyond handing ``sys.argv[1:]`` to ``cli.main``."""

from __future__ import annotations

import sys

from layerscope.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
