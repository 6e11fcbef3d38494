from pyisolate import ExtensionBase


class FailsOnLoad(ExtensionBase):
    def on_module_loaded(self, module):
        raise RuntimeError("on_module_loaded refused to start")
