"""Stand-in for `imagesize` (our own code). processor_omni.py imports it at module level but never
calls it. `get` raises."""


def get(*args, **kwargs):
    raise RuntimeError("imagesize stub: not available in the reference venv")
