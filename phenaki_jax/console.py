"""What a person reads on the console: this job's own lines, not the libraries' internals."""
from __future__ import annotations

import logging as logging_lib

from absl import logging


# Libraries whose INFO lines (Orbax's save machinery, CLU, grain) would drown
# ours on the console: a default run shows our start-up, progress, eval and
# checkpoint lines, and their warnings and errors.
LIBRARY_LOG_PATHS = ("/orbax/", "/clu/", "/grain/", "/etils/", "/tensorstore/")


class _LibraryInfoFilter(logging_lib.Filter):
  def filter(self, record: logging_lib.LogRecord) -> bool:
    if record.levelno >= logging_lib.WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return not any(part in path for part in LIBRARY_LOG_PATHS)


_LIBRARY_FILTER = _LibraryInfoFilter()


def quiet_library_logs(quiet: bool = True) -> None:
  """Drops the libraries' INFO lines from the console (absl's handler); False restores them."""
  handler = logging.get_absl_handler()
  if quiet:
    handler.addFilter(_LIBRARY_FILTER)
  else:
    handler.removeFilter(_LIBRARY_FILTER)
