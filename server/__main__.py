"""``python -m layerscope.server`` is the ``layerscope`` command."""

from layerscope.server.cli import main

raise SystemExit(main())
