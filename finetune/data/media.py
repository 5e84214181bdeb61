"""Media readers for images, audio and video (Pillow, soundfile, scipy, optional PyAV).

DICOM and NIfTI images are read by :mod:`finetune.data.medical` (the
``[medical]`` extra); :func:`load_images` applies an image part's options.

Every failure is raised as :class:`MediaError` with a message that names the
file; :mod:`finetune.data.check` turns it into a located DataError.
"""

from __future__ import annotations

import re
from math import gcd
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.schema import Part
from finetune.errors import UserError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")
MEDICAL_SUFFIXES = (".dcm", ".dicom", ".ima", ".nii", ".nii.gz")  # see finetune.data.medical

_AUDIO_FORMATS_HINT = (
    "soundfile reads WAV, FLAC, OGG/Vorbis and MP3 (MP3 needs libsndfile>=1.1); "
    "convert other formats first, e.g. ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav"
)


class MediaError(UserError):
    """A media file could not be read; ``kind`` optionally refines the category."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


def _is_medical(path: Path) -> bool:
    # DICOM/NIfTI by extension, or an extension-less DICOM file (DICM marker).
    from finetune.data.medical import is_medical

    return is_medical(path)


def load_images(part: Part) -> list[Image.Image]:
    """All RGB images of an image part, with the part's options applied.

    An ordinary image gives one image. A DICOM file or NIfTI volume is read
    by :mod:`finetune.data.medical` with ``part.extra`` as options (window,
    frame, slice, ...); a NIfTI part with ``"slices": n`` gives n images.
    """
    path = _image_part_path(part)
    if _is_medical(path):
        from finetune.data.medical import read_medical_images

        return read_medical_images(path, part.extra)
    return [load_image(path)]


def image_sizes(part: Part) -> list[tuple[int, int]]:
    """``(width, height)`` of every image :func:`load_images` gives, from headers only."""
    path = _image_part_path(part)
    if _is_medical(path):
        from finetune.data.medical import medical_image_sizes

        return medical_image_sizes(path, part.extra)
    return [image_size(path)]


def _image_part_path(part: Part) -> Path:
    if part.path is None:
        raise MediaError("the image part has no 'path'")
    return Path(part.path)


def load_image(path: Path) -> Image.Image:
    """Decode an image fully and return it as RGB.

    DICOM/NIfTI files give their default image (middle frame or middle axial
    slice, window from the file or min-max); use :func:`load_images` to apply
    a part's options.
    """
    path = Path(path)
    if _is_medical(path):
        from finetune.data.medical import read_medical_images

        return read_medical_images(path, {})[0]
    try:
        with Image.open(path) as im:
            # load() forces the full decode so truncated files fail here,
            # not later inside a DataLoader worker.
            im.load()
            return _to_rgb(upright(im), path)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"image '{path}' does not exist") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise MediaError(f"cannot decode image '{path}': {e}") from e


# EXIF orientations 5-8 turn the stored image by 90 degrees: its displayed width is the stored height
_TRANSPOSED = (5, 6, 7, 8)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)  # 0x0112: the EXIF Orientation tag
    except Exception:  # an unreadable EXIF block: shown as stored, as viewers do
        return 1


def upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: a phone photo's EXIF orientation applied (as transformers'
    own image loading does), so a picture taken sideways is not learned sideways."""
    from PIL import ImageOps

    if _orientation(im) == 1:
        return im
    return ImageOps.exif_transpose(im)


def _to_rgb(im: Image.Image, path: Path | str = "") -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow clips high-bit-depth values to 255 when converting to RGB,
        # which turns 12/16-bit scans white; stretch the used range instead.
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise MediaError(f"image '{path}' holds {int((~np.isfinite(arr)).sum())} NaN or infinite pixel value(s); "
                             "replace them with numbers (e.g. numpy.nan_to_num) and save it again",
                             kind="non_finite")
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    return im.convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` read from the image header, without decoding pixels."""
    path = Path(path)
    if _is_medical(path):
        from finetune.data.medical import medical_image_sizes

        return medical_image_sizes(path, {})[0]
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (h, w) if _orientation(im) in _TRANSPOSED else (w, h)
    except FileNotFoundError:
        raise MediaError(f"image '{path}' does not exist") from None
    except Exception as e:
        raise MediaError(f"cannot read image header of '{path}': {e}") from e


def load_audio(path: Path, sampling_rate: int | None = 16000) -> np.ndarray:
    """Decode audio as float32 mono in [-1, 1], resampled to ``sampling_rate``.

    ``sampling_rate=None`` keeps the file's own rate (used by the checker,
    which only needs to know the file decodes).
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise MediaError(f"audio '{path}' does not exist")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # LibsndfileError, or RuntimeError from older soundfile
        raise MediaError(
            f"cannot read audio '{path}': {_sf_reason(e)}; {_AUDIO_FORMATS_HINT}",
            kind="unreadable_audio",
        ) from e
    if data.shape[0] == 0:
        raise MediaError(f"audio '{path}' has no samples", kind="empty_audio")
    bad = ~np.isfinite(data)
    if bad.any():  # float WAV/FLAC can hold NaN or inf: one such sample poisons the loss
        first = int(np.argmax(bad.any(axis=1)))
        raise MediaError(f"audio '{path}' holds {int(bad.sum())} NaN or infinite sample(s), the first at "
                         f"{first / sr:.3f} s; re-export the recording (or replace them, e.g. numpy.nan_to_num)",
                         kind="non_finite")
    short = _wav_truncated(path)
    if short:
        raise MediaError(f"audio '{path}' is truncated: {short}; re-export or re-copy the recording",
                         kind="unreadable_audio")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sampling_rate is not None and sr != sampling_rate:
        from scipy.signal import resample_poly

        g = gcd(int(sr), int(sampling_rate))
        wav = resample_poly(wav, sampling_rate // g, int(sr) // g)
    # The polyphase filter can overshoot full scale slightly on loud input.
    return np.ascontiguousarray(np.clip(wav, -1.0, 1.0), dtype=np.float32)


def _wav_truncated(path: Path) -> str | None:
    """For RIFF/WAVE files: the data chunk's declared size against the bytes present (libsndfile
    silently reads what is there, so a cut-off copy would train on part of a recording)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    size = path.stat().st_size
    while pos + 8 <= len(head):
        cid, n = head[pos:pos + 4], struct.unpack("<I", head[pos + 4:pos + 8])[0]
        if cid == b"data":
            have = size - (pos + 8)
            # 0 and 0xFFFFFFFF mark streamed files whose size was never filled in
            if n not in (0, 0xFFFFFFFF) and n > have:
                return f"its header declares {n} bytes of samples, the file holds {have}"
            return None
        pos += 8 + n + (n & 1)
    return None


def _sf_reason(e: Exception) -> str:
    # libsndfile repeats the path ("Error opening '<path>': ..."); our message
    # already names it, so keep only the reason.
    return re.sub(r"^Error opening .*?: ", "", str(e)).rstrip(". ")


def audio_duration(path: Path) -> float:
    """Duration in seconds from the audio header, without decoding samples."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise MediaError(f"audio '{path}' does not exist")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise MediaError(
            f"cannot read audio header of '{path}': {_sf_reason(e)}; {_AUDIO_FORMATS_HINT}",
            kind="unreadable_audio",
        ) from e
    return float(info.frames) / float(info.samplerate) if info.samplerate else 0.0


def _natural_key(path: Path):
    # frame_2 must come before frame_10, which plain string sorting gets wrong.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def list_video_frames(part_path: Path) -> list[Path]:
    """Image files of a frame folder, in natural (numeric-aware) name order."""
    folder = Path(part_path)
    if not folder.is_dir():
        raise MediaError(f"'{folder}' is not a folder of frames")
    frames = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    if not frames:
        raise MediaError(
            f"folder '{folder}' has no frame images ({', '.join(FRAME_SUFFIXES)})"
        )
    return sorted(frames, key=_natural_key)


def _even_indices(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return [int(round(x)) for x in np.linspace(0, n - 1, k)]


def _fps_indices(n: int, src_fps: float | None, fps: float | None) -> list[int]:
    if not fps or not src_fps or fps >= src_fps:
        return list(range(n))
    step = src_fps / fps
    return sorted({int(i * step) for i in range(int(n / step) + 1) if int(i * step) < n})


def load_video(part: Part, max_frames: int, fps: float | None = None) -> list[Image.Image]:
    """Frames of a video part as RGB images, evenly subsampled to at most ``max_frames``.

    The part may hold ``frames`` (a list of images), a folder of frames in
    ``path``, or a video file (decoded with PyAV when installed). ``fps``
    thins frames first when the source rate is known (video files, or a frame
    folder whose part carries ``"fps"``).
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, not {max_frames}")
    if part.frames:
        return _load_frame_list(list(part.frames), max_frames, fps, part.extra.get("fps"))
    if part.path is None:
        raise MediaError("the video part has neither 'path' nor 'frames'")
    path = Path(part.path)
    if path.is_dir():
        return _load_frame_list(list_video_frames(path), max_frames, fps, part.extra.get("fps"))
    if not path.exists():
        raise MediaError(f"video '{path}' does not exist")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _load_video_file(path, max_frames, fps)
    raise MediaError(
        f"'{path}' is not a frame folder or a video file ({', '.join(VIDEO_SUFFIXES)})"
    )


def _load_frame_list(frames: list[Path], max_frames: int, fps, src_fps) -> list[Image.Image]:
    picked = [frames[i] for i in _fps_indices(len(frames), src_fps, fps)]
    picked = [picked[i] for i in _even_indices(len(picked), max_frames)]
    return [load_image(p) for p in picked]


def _load_video_file(path: Path, max_frames: int, fps: float | None) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise MediaError(
            f"reading video file '{path}' needs PyAV: pip install av "
            "(or give the video as a folder of frames)"
        ) from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            src_fps = float(stream.average_rate) if stream.average_rate else None
            # Decoding keeps every frame briefly; clips for fine-tuning are short.
            images = [f.to_image() for f in container.decode(stream)]
    except Exception as e:
        raise MediaError(f"cannot decode video '{path}': {e}") from e
    if not images:
        raise MediaError(f"video '{path}' has no frames")
    picked = [images[i] for i in _fps_indices(len(images), src_fps, fps)]
    return [picked[i].convert("RGB") for i in _even_indices(len(picked), max_frames)]


def audio_samples(path: Path, sampling_rate: int = 16000) -> int:
    """Samples :func:`load_audio` gives for a file at ``sampling_rate``, from the header alone
    (the polyphase resampler's output length, ceil(frames * up / down))."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise MediaError(f"audio '{path}' does not exist")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise MediaError(
            f"cannot read audio header of '{path}': {_sf_reason(e)}; {_AUDIO_FORMATS_HINT}",
            kind="unreadable_audio",
        ) from e
    frames, sr = int(info.frames), int(info.samplerate)
    if not sr or sr == sampling_rate:
        return frames
    g = gcd(sr, int(sampling_rate))
    up, down = int(sampling_rate) // g, sr // g
    return -(-frames * up // down)


def video_has_audio(path: Path) -> bool:
    """Whether a video file has a sound track (container header only; False for frame folders)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in VIDEO_SUFFIXES:
        return False
    try:
        import av
    except ImportError:
        raise MediaError(f"reading video file '{path}' needs PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except Exception as e:
        raise MediaError(f"cannot read the header of video '{path}': {e}", kind="unreadable_video") from e


def load_video_audio(path: Path, sampling_rate: int = 16000) -> np.ndarray | None:
    """A video file's own sound track as float32 mono in [-1, 1] at ``sampling_rate`` (channels
    averaged and resampled as :func:`load_audio` does an audio file), or None when the file has no
    sound track (a silent video, a folder of frames). Decoded with PyAV."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in VIDEO_SUFFIXES:
        return None
    if not path.exists():
        raise MediaError(f"video '{path}' does not exist")
    try:
        import av
    except ImportError:
        raise MediaError(f"reading the sound of video file '{path}' needs PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            sr, chunks = None, []
            # planar float at the stream's own rate and layout: one row per channel, whatever the codec's format
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:
                    sr = int(frame.sample_rate)
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sr)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
    except Exception as e:
        raise MediaError(f"cannot decode the sound of video '{path}': {e}", kind="unreadable_video") from e
    if not chunks or not sum(c.shape[-1] for c in chunks):
        raise MediaError(f"the sound track of video '{path}' has no samples; re-export the video (or read it "
                         "without its sound: use_audio_in_video false)", kind="unreadable_video")
    data = np.concatenate(chunks, axis=-1).astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.any():
        raise MediaError(f"the sound track of video '{path}' holds {int(bad.sum())} NaN or infinite sample(s); "
                         "re-export the video", kind="non_finite")
    wav = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    if sr != sampling_rate:
        from scipy.signal import resample_poly

        g = gcd(int(sr), int(sampling_rate))
        wav = resample_poly(wav, sampling_rate // g, int(sr) // g)
    return np.ascontiguousarray(np.clip(wav, -1.0, 1.0), dtype=np.float32)
