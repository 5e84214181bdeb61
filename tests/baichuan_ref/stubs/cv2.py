"""Stand-in for OpenCV `cv2` (our own code). processor_omni.py imports cv2 at module level and uses
it only to write decoded video frames to JPEG files (cv2.cvtColor + cv2.imwrite) in the "1fps" video
path, which the harness does not use. Calls raise."""

COLOR_RGB2BGR = 4
COLOR_BGR2RGB = 4


def _unavailable(*args, **kwargs):
    raise RuntimeError("cv2 stub: OpenCV is not available in the reference venv")


cvtColor = _unavailable
imwrite = _unavailable
imread = _unavailable
