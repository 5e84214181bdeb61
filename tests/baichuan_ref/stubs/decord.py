"""Stand-in for `decord` (our own code). processor_omni.py does `from decord import VideoReader, cpu`
at import time; decord is only used to read video files in the "1fps" decode path. The harness feeds
video as explicit frames (`<videoframe_start_omni>{json}<videoframe_end_omni>`), so decord is never
called: both names exist and raise if used."""


def cpu(device_id=0):
    return ("cpu", device_id)


class VideoReader:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("decord stub: video decoding is not available; pass frames explicitly")
