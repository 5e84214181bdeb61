"""Stand-in for PyAV `av` (our own code). processor_omni.py imports av at module level; it is only
used by the "key"-frame video decode path (not configured: video_config.decode_way is "1fps").
`av.open` raises."""


def open(*args, **kwargs):  # mirrors av.open
    raise RuntimeError("av stub: PyAV is not available in the reference venv")
