"""An extension that prints, writes to stderr and logs, like any library it might use."""

import logging
import sys

from pyisolate import ExtensionBase

log = logging.getLogger("talker.work")


class Talker(ExtensionBase):
    def work(self, items):
        print(f"working on {len(items)} items")  # stdout: INFO in the host
        log.debug("items: %r", items)  # below the level the host asked for: never sent
        log.info("half way")
        if len(items) > 2:
            log.warning("that is a lot of items")
        sys.stderr.write("a line on stderr\n")  # stderr: WARNING in the host
        return sum(items)
