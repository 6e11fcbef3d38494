"""A host service that extensions reach by its actor name, "AuditLog"."""

from pyisolate import ProxiedSingleton


class AuditLog(ProxiedSingleton):
    def __init__(self):
        self.entries = []

    def record(self, who, what):
        self.entries.append(f"{who}: {what}")
        return len(self.entries)
