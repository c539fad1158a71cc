"""polymodal's log lines, shown as vLLM shows its own: the "polymodal" logger writes INFO and
above to stderr (`INFO 12-05 04:33:01 [polymodal] ...`): options taken with no effect, the KV
pool's size, requests with `--enable-log-requests`. An application that configured logging
first (a handler on the root logger) gets the records through its own handlers instead;
`POLYMODAL_CONFIGURE_LOGGING=0` leaves logging alone."""

from __future__ import annotations

import logging
import os


def configure() -> None:
    """Give the "polymodal" logger a stderr handler at INFO, unless told not to or the
    application's root logger already has handlers."""
    if os.environ.get("POLYMODAL_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger("polymodal")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per record, not a second through the root
