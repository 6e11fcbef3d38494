"""The application's own ExtensionBase subclass, for the plain-module pattern."""

from pyisolate import ExtensionBase


class AppExtension(ExtensionBase):
    def before_module_loaded(self):
        self.order = ["before_module_loaded"]

    def on_module_loaded(self, module):
        self.module = module
        self.order.append("on_module_loaded")

    def call_module(self, function, *args):
        return getattr(self.module, function)(*args)

    def module_attr(self, name):
        return getattr(self.module, name)

    def hook_order(self):
        return self.order

    def pid(self):
        import os

        return os.getpid()
