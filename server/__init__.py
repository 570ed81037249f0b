"""layerscope.server — ingest, storage, fan-out, control relay, launcher and pages.

Never imports torch (a test checks): the server runs on machines without it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerscope")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
