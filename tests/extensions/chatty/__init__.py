"""An extension that talks: prints, writes to stderr, logs at every level, then crashes on request."""

import logging
import os
import sys

from pyisolate import ExtensionBase

log = logging.getLogger("chatty.inner")


class ChattyExtension(ExtensionBase):
    def talk(self, tag):
        """Say ``tag`` every way there is; the last line on each stream is ``<tag> end``."""
        print(f"{tag} printed")
        sys.stderr.write(f"{tag} on stderr\n")
        log.debug("%s debug", tag)
        log.info("%s info", tag)
        log.warning("%s warning", tag)
        log.error("%s error", tag)
        logging.warning("%s from the root logger", tag)
        try:
            raise ValueError(f"{tag} failed")
        except ValueError:
            log.exception("%s caught", tag)
        sys.stderr.write(f"{tag} half a line, then ")  # a record follows before the newline
        sys.stderr.flush()
        log.warning("%s after the half line", tag)
        print(f"{tag} end")
        sys.stderr.write(f"{tag} end\n")
        return True

    def garbage(self, size):
        """Bytes that are not UTF-8, then a line of ``size`` bytes, then ``garbage end`` on both."""
        sys.stderr.flush()
        os.write(2, b"bad \xff\xfe\x00 bytes\n")
        os.write(2, b"x" * size + b"\n")
        os.write(1, b"y" * size + b"\n")
        os.write(1, b"garbage end\n")
        os.write(2, b"garbage end\n")
        return True

    async def crash(self, code):
        print("last words on stdout")
        log.error("last record")
        sys.stderr.write("last words on stderr, no newline")
        sys.stderr.flush()
        os._exit(code)
