"""Stand-in for python-fire (our own code). audio_modeling_omni.py, visual_modeling_omni.py and
processor_omni.py `import fire` at module level and only call `fire.Fire()` under
`if __name__ == '__main__'`, which never runs when they are imported. Raises if called."""


def Fire(*args, **kwargs):  # mirrors fire.Fire
    raise RuntimeError("fire stub: command-line entry points are not available")
