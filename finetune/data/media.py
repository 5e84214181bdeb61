"""Media readers for images, audio and video (Pillow, soundfile, scipy, optional PyAV).

DICOM and NIfTI images are read by :mod:`finetune.data.medical` (the
``[medical]`` extra); :func:`load_images` applies an image part's options.

Every failure is raised as :class:`MediaError` (defined in :mod:`finetune.data.schema`, below
this module and medical) with a message that names the file; :mod:`finetune.data.check` turns it
into a located DataError.

Sizes are read from headers before anything is decoded and held against the
current :class:`~finetune.data.schema.Limits` (the recipe's ``data.max_*``):
image pixels, audio length (and sample rate), video frames and seconds. Only
regular files are opened.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from math import gcd
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.medical import is_medical, medical_image_sizes, read_medical_images
from finetune.data.schema import (
    MediaError,
    NotRegularFileError,
    Part,
    check_image_pixels,
    current_limits,
    open_regular,
    require_regular,
    special_file,
    too_many_pixels,
)

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: the image formats Pillow may open: raster formats with their own decoders (not EPS, which runs
#: Ghostscript when it is installed, nor plugins that shell out or read external files)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA")  # (JPEG opens MPO too)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")

_AUDIO_FORMATS_HINT = (
    "soundfile reads WAV, FLAC, OGG/Vorbis and MP3 (MP3 needs libsndfile>=1.1); "
    "convert other formats first, e.g. ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav"
)


#: `data.max_audio_seconds` counts samples at this rate at most: a 192 kHz file decodes four times the
#: samples a second, so it may be a quarter as long (the decoded samples, not the seconds, take memory).
AUDIO_BUDGET_RATE = 48_000
#: Sample rates above this are refused: no recorder writes them, and resampling from a rate such as
#: 2**31 - 1 Hz (a prime) to 16 kHz needs a filter of billions of taps.
MAX_AUDIO_RATE = 384_000
_AUDIO_BLOCK = 1 << 22  # samples (frames x channels) decoded at a time, mixed to mono as they come
_SF_UNKNOWN = 1 << 62  # libsndfile reports an unknown length (a streamed FLAC) as SF_COUNT_MAX


@contextlib.contextmanager
def _open_image(path: Path):
    """Pillow's lazy open (header only) of a regular file, refused when the header claims more than
    data.max_image_pixels. Pillow's own bomb guard is kept at or above the recipe's cap, so that it never
    refuses what the recipe allows, and its warning is not printed for an image refused here anyway."""
    require_regular(path, "image")
    cap = current_limits().max_image_pixels
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < cap:
        Image.MAX_IMAGE_PIXELS = cap
    try:
        fh = open_regular(path)
    except NotRegularFileError as e:
        raise MediaError(str(e), kind="not_regular_file") from None
    with fh:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                Image.init()  # every plugin registered, so that each of IMAGE_FORMATS is known by name
                im = Image.open(fh, formats=IMAGE_FORMATS)
            except Image.DecompressionBombError as e:
                n = re.search(r"\((\d+) pixels\)", str(e))
                raise too_many_pixels(path, "image", int(n.group(1)) if n else None) from None
        with im:
            check_image_pixels(path, *im.size)
            yield im


def load_images(part: Part) -> list[Image.Image]:
    """All RGB images of an image part, with the part's options applied.

    An ordinary image gives one image. A DICOM file or NIfTI volume is read
    by :mod:`finetune.data.medical` with ``part.extra`` as options (window,
    frame, slice, ...); a NIfTI part with ``"slices": n`` gives n images.
    """
    path = _image_part_path(part)
    if is_medical(path):
        return read_medical_images(path, part.extra)
    return [load_image(path)]


def image_sizes(part: Part) -> list[tuple[int, int]]:
    """``(width, height)`` of every image :func:`load_images` gives, from headers only."""
    path = _image_part_path(part)
    if is_medical(path):
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
    if is_medical(path):
        return read_medical_images(path, {})[0]
    try:
        with _open_image(path) as im:
            # load() forces the full decode so truncated files fail here,
            # not later inside a DataLoader worker.
            im.load()
            return _to_rgb(upright(im), path)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"image '{path}' does not exist") from None
    except MemoryError:
        raise MediaError(f"decoding image '{path}' ran out of memory", kind="out_of_memory",
                         fix="downsample the image, or lower data.max_image_pixels") from None
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
    if is_medical(path):
        return medical_image_sizes(path, {})[0]
    try:
        with _open_image(path) as im:
            w, h = im.size
            return (h, w) if _orientation(im) in _TRANSPOSED else (w, h)
    except MediaError:
        raise
    except FileNotFoundError:
        raise MediaError(f"image '{path}' does not exist") from None
    except Exception as e:
        raise MediaError(f"cannot read image header of '{path}': {e}") from e


def load_audio(path: Path, sampling_rate: int | None = 16000) -> np.ndarray:
    """Decode audio as float32 mono in [-1, 1], resampled to ``sampling_rate``.

    ``sampling_rate=None`` keeps the file's own rate (used by the checker,
    which only needs to know the file decodes). The length is checked from the
    header first (data.max_audio_seconds) and the samples are decoded a block at
    a time, mixed to mono as they come, never past that cap whatever the header says.
    """
    import soundfile as sf

    path = Path(path)
    info, unknown = _audio_header(path)
    sr = int(info.samplerate)
    budget = _audio_frame_budget(sr)
    # mono samples land in one array sized from the header; a header that understated the length
    # (or gave none) continues in a list of blocks, still never past the budget
    mono = None if unknown else np.empty(int(info.frames), dtype=np.float32)
    blocks: list[np.ndarray] = []
    n = n_bad = 0
    first_bad = -1
    try:
        with sf.SoundFile(str(path)) as f:
            step = max(1, _AUDIO_BLOCK // max(1, f.channels))  # an Ogg file may have 255 channels
            while True:
                block = f.read(step, dtype="float32", always_2d=True)
                k = block.shape[0]
                if k == 0:
                    break
                if n + k > budget:
                    raise _too_long_audio(path, None, sr, decoded=True)
                bad = ~np.isfinite(block)
                if bad.any():  # float WAV/FLAC can hold NaN or inf: one such sample poisons the loss
                    if first_bad < 0:
                        first_bad = n + int(np.argmax(bad.any(axis=1)))
                    n_bad += int(bad.sum())
                part = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
                if mono is not None and n + k <= len(mono):
                    mono[n:n + k] = part
                else:
                    if mono is not None:
                        blocks, mono = [mono[:n]], None
                    blocks.append(np.array(part, dtype=np.float32))
                n += k
    except MediaError:
        raise
    except MemoryError:
        raise MediaError(f"decoding audio '{path}' ran out of memory", kind="out_of_memory",
                         fix="cut the recording into shorter clips, or lower data.max_audio_seconds") from None
    except Exception as e:  # LibsndfileError, or RuntimeError from older soundfile
        raise MediaError(
            f"cannot read audio '{path}': {_sf_reason(e)}; {_AUDIO_FORMATS_HINT}",
            kind="unreadable_audio",
        ) from e
    if n == 0:
        raise MediaError(f"audio '{path}' has no samples", kind="empty_audio")
    if n_bad:
        raise MediaError(f"audio '{path}' holds {n_bad} NaN or infinite sample(s), the first at "
                         f"{first_bad / sr:.3f} s; re-export the recording (or replace them, e.g. numpy.nan_to_num)",
                         kind="non_finite")
    short = _wav_truncated(path)
    if short:
        raise MediaError(f"audio '{path}' is truncated: {short}; re-export or re-copy the recording",
                         kind="unreadable_audio")
    wav = mono[:n] if mono is not None else np.concatenate(blocks)
    del blocks
    if sampling_rate is not None and sr != sampling_rate:
        from scipy.signal import resample_poly

        g = gcd(int(sr), int(sampling_rate))
        wav = resample_poly(wav, sampling_rate // g, int(sr) // g)
    # The polyphase filter can overshoot full scale slightly on loud input. (In place: `wav` is ours, and
    # an hour of audio is hundreds of MB.)
    np.clip(wav, -1.0, 1.0, out=wav)
    return np.ascontiguousarray(wav, dtype=np.float32)


def _audio_frame_budget(rate: int) -> int:
    """Frames of one recording that may be decoded: data.max_audio_seconds, counted at up to 48 kHz."""
    return int(current_limits().max_audio_seconds * min(int(rate), AUDIO_BUDGET_RATE))


def _too_long_audio(path: Path, frames: int | None, rate: int, decoded: bool = False) -> MediaError:
    cap = current_limits().max_audio_seconds
    cap_text = f"{cap:g}"
    if decoded:
        got = f"holds more than {_audio_frame_budget(rate) / rate:,.0f} s at {rate:,} Hz (found while decoding; " \
              "its header does not say)"
    else:
        got = f"lasts {frames / rate:,.0f} s at {rate:,} Hz (from its header)"
    if rate > AUDIO_BUDGET_RATE and (decoded or frames / rate <= cap):
        return MediaError(f"audio '{path}' {got}: more samples than data.max_audio_seconds={cap_text} allows at "
                          f"{AUDIO_BUDGET_RATE // 1000} kHz; it was not decoded", kind="too_large",
                          fix=f"resample it to {AUDIO_BUDGET_RATE // 1000} kHz or less (e.g. ffmpeg -i IN -ar 16000 "
                              "OUT.flac; the models hear 16 kHz), cut it shorter, or raise data.max_audio_seconds")
    return MediaError(f"audio '{path}' {got}, longer than data.max_audio_seconds={cap_text}; it was not decoded",
                      kind="too_large",
                      fix="cut it into shorter clips (e.g. ffmpeg -i IN -f segment -segment_time 600 OUT%03d.flac), "
                          "or raise data.max_audio_seconds in the recipe")


def _audio_header(path: Path):
    """(soundfile's info, whether its length is unknown), with the rate and length checked against the caps."""
    import soundfile as sf

    if not path.exists():
        raise MediaError(f"audio '{path}' does not exist")
    require_regular(path, "audio")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise MediaError(
            f"cannot read audio header of '{path}': {_sf_reason(e)}; {_AUDIO_FORMATS_HINT}",
            kind="unreadable_audio",
        ) from e
    rate = int(info.samplerate)
    if not 0 < rate <= MAX_AUDIO_RATE:
        raise MediaError(f"audio '{path}' has a sample rate of {rate:,} Hz in its header; rates from 1 to "
                         f"{MAX_AUDIO_RATE:,} Hz are read", kind="unreadable_audio",
                         fix="re-encode it at a real rate, e.g. ffmpeg -i IN -ar 16000 OUT.flac")
    unknown = not 0 <= int(info.frames) < _SF_UNKNOWN
    if not unknown and int(info.frames) > _audio_frame_budget(rate):
        raise _too_long_audio(path, int(info.frames), rate)
    return info, unknown


def _wav_truncated(path: Path) -> str | None:
    """For RIFF/WAVE files: the data chunk's declared size against the bytes present (libsndfile
    silently reads what is there, so a cut-off copy would train on part of a recording)."""
    import struct

    with open_regular(path) as f:
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
    """Duration in seconds from the audio header, without decoding samples (a file whose header
    does not give its length, such as a streamed FLAC, is counted by decoding, up to the cap)."""
    import soundfile as sf

    path = Path(path)
    info, unknown = _audio_header(path)
    rate = int(info.samplerate)
    if not unknown:
        return float(info.frames) / float(rate)
    n, budget = 0, _audio_frame_budget(rate)
    try:
        with sf.SoundFile(str(path)) as f:
            step = max(1, _AUDIO_BLOCK // max(1, f.channels))
            while True:
                got = len(f.read(step, dtype="int16", always_2d=True))
                if not got:
                    break
                n += got
                if n > budget:
                    raise _too_long_audio(path, None, rate, decoded=True)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot read audio '{path}': {_sf_reason(e)}; {_AUDIO_FORMATS_HINT}",
                         kind="unreadable_audio") from e
    return n / float(rate)


def _natural_key(path: Path):
    # frame_2 must come before frame_10, which plain string sorting gets wrong.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _too_many_frames(what: str, n: int | str, source: str = "") -> MediaError:
    cap = current_limits().max_video_frames
    return MediaError(f"{what} has {n if isinstance(n, str) else f'{n:,}'} frames{source}, more than "
                      f"data.max_video_frames={cap:,}; it was not decoded", kind="too_large",
                      fix="cut the video shorter or lower its frame rate (e.g. ffmpeg -i IN -r 2 OUT.mp4; the models "
                          "sample model.video_fps frames a second), or raise data.max_video_frames in the recipe")


def check_frame_count(n: int, what: str) -> None:
    """Refuse a video of more than data.max_video_frames frames (a frame list or folder, before decoding)."""
    if n > current_limits().max_video_frames:
        raise _too_many_frames(what, n)


def list_video_frames(part_path: Path) -> list[Path]:
    """Image files of a frame folder, in natural (numeric-aware) name order; refused past
    data.max_video_frames, or when one of them is not a regular file (a FIFO named 001.png)."""
    folder = Path(part_path)
    if not folder.is_dir():
        raise MediaError(f"'{folder}' is not a folder of frames")
    cap = current_limits().max_video_frames
    frames = []
    for p in folder.iterdir():
        if p.suffix.lower() not in FRAME_SUFFIXES:
            continue
        kind = special_file(p)
        if kind == "a folder":
            continue
        if kind is not None:
            require_regular(p, "video frame")
        frames.append(p)
        if len(frames) > cap:
            raise _too_many_frames(f"frame folder '{folder}'", f"more than {cap:,}")
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
    return load_video_indexed(part, max_frames, fps)[0]


def load_video_indexed(part: Part, max_frames: int, fps: float | None = None
                       ) -> tuple[list[Image.Image], list[int], float | None]:
    """`load_video`'s frames, each one's index in the source, and the source's frame rate (the file's,
    or the part's "fps" for frame lists and folders; None where unknown): a frame's time is its
    index over that rate."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, not {max_frames}")
    if part.frames:
        check_frame_count(len(part.frames), "the video's frame list")
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


def _load_frame_list(frames: list[Path], max_frames: int, fps, src_fps):
    kept = _fps_indices(len(frames), src_fps, fps)
    picked = [kept[i] for i in _even_indices(len(kept), max_frames)]
    return [load_image(frames[i]) for i in picked], picked, src_fps


def _load_video_file(path: Path, max_frames: int, fps: float | None):
    """Frames of a video file: the header's frame size, duration and frame count checked first, the
    packets counted without decoding (a header may lie), then one decoding pass that keeps only the
    frames picked (memory for `max_frames` images, whatever the video's length)."""
    try:
        import av
    except ImportError:
        raise MediaError(
            f"reading video file '{path}' needs PyAV: pip install av "
            "(or give the video as a folder of frames)"
        ) from None
    require_regular(path, "video")
    limits = current_limits()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"video '{path}' has no video stream", kind="unreadable_video")
            stream = container.streams.video[0]
            src_fps = float(stream.average_rate) if stream.average_rate else None
            check_image_pixels(path, stream.codec_context.width, stream.codec_context.height, "video frame of")
            seconds = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                       else (container.duration / 1e6 if container.duration else None))
            if seconds is not None and seconds > limits.max_video_seconds:
                raise MediaError(f"video '{path}' lasts {seconds:,.0f} s (from its header), longer than "
                                 f"data.max_video_seconds={limits.max_video_seconds:g}; it was not decoded",
                                 kind="too_large",
                                 fix="cut it shorter (e.g. ffmpeg -i IN -t 600 -c copy OUT.mp4), or raise "
                                     "data.max_video_seconds in the recipe")
            if stream.frames and stream.frames > limits.max_video_frames:
                raise _too_many_frames(f"video '{path}'", int(stream.frames), " (from its header)")
            n = 0
            for packet in container.demux(stream):
                if packet.size:
                    n += 1
                    if n > limits.max_video_frames:
                        raise _too_many_frames(f"video '{path}'", f"more than {limits.max_video_frames:,}",
                                               " (counted in its stream)")
        picked = _fps_indices(n, src_fps, fps)
        wanted = {picked[i]: k for k, i in enumerate(_even_indices(len(picked), max_frames))}
        images: dict[int, Image.Image] = {}
        last = None
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for i, frame in enumerate(container.decode(stream)):
                if i >= n or len(images) == len(wanted):
                    break
                check_image_pixels(path, frame.width, frame.height, "video frame of")
                if i in wanted:
                    images[wanted[i]] = frame.to_image()
                last = frame
            if last is not None and len(images) < len(wanted):
                # fewer frames decoded than packets counted: the last one stands in for the missing
                tail = last.to_image()
                images.update({k: tail for k in wanted.values() if k not in images})
    except MediaError:
        raise
    except MemoryError:
        raise MediaError(f"decoding video '{path}' ran out of memory", kind="out_of_memory",
                         fix="downscale the video or cut it shorter") from None
    except Exception as e:
        raise MediaError(f"cannot decode video '{path}': {e}") from e
    if not images:
        raise MediaError(f"video '{path}' has no frames")
    order = sorted(wanted, key=wanted.get)
    return [images[k].convert("RGB") for k in sorted(images)], order, src_fps


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
    require_regular(path, "video")
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
            resampler, decoded = None, 0
            for frame in container.decode(stream):
                if resampler is None:
                    sr = int(frame.sample_rate)
                    if not 1 <= sr <= 384_000:
                        raise MediaError(f"the sound of video '{path}' has a sample rate of {sr} Hz",
                                         kind="unreadable_video", fix="re-export the video's sound at 16-48 kHz")
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sr)
                decoded += int(frame.samples)
                if decoded > _audio_frame_budget(sr):  # data.max_audio_seconds, as for an audio file
                    raise _too_long_audio(path, None, sr, decoded=True)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
    except MediaError:
        raise
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
