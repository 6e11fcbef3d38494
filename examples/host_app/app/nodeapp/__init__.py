"""The host application's own package (a stand-in for ComfyUI's): its model and value types.

The host imports it from examples/host_app/app; workers import it from the same folder, which
the host grants them as ``host_paths`` (readable, never writable).
"""
