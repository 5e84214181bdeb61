"""DICOM and NIfTI images for image parts (the ``[medical]`` extra: pydicom, nibabel).

An image part may point at a DICOM file (``.dcm``, ``.dicom``, ``.ima``, or an
extension-less file with the ``DICM`` marker) or a NIfTI volume (``.nii``,
``.nii.gz``). The part's other JSON keys (:attr:`Part.extra`) are the options::

    {"type": "image", "path": "ct/0001.dcm", "window": "lung"}
    {"type": "image", "path": "mr/brain.nii.gz", "axis": 2, "slices": 3}

Options
-------
Windowing (DICOM and NIfTI), in priority order:

* ``"window"``: a preset name (see :data:`WINDOW_PRESETS`, e.g. ``"lung"``),
  ``[centre, width]``, or ``"minmax"`` (stretch the data's own range);
* ``"window_center"`` and ``"window_width"`` (numbers, given together);
* otherwise the DICOM file's VOI LUT Sequence (pydicom's ``apply_voi_lut``; its
  output range, 0 .. 2**bits - 1 by the LUT descriptor, is shown as 0 .. 255);
  otherwise its WindowCenter/WindowWidth (the first value when there are
  several); otherwise the min-max of the image (for NIfTI, of each slice).

Values are rescaled first (a DICOM Modality LUT Sequence through pydicom's
``apply_modality_lut``, or RescaleSlope/RescaleIntercept; NIfTI
scl_slope/scl_inter as applied by nibabel), so CT windows are in Hounsfield
units. The window maps ``centre - width/2 .. centre + width/2`` linearly to
``0 .. 255``: below is 0, above is 255, the centre is 127.5 (rounded to 128).
MONOCHROME1 DICOM images are inverted after windowing; colour DICOM images
(RGB, YBR, palette) are passed through and ignore the window.

DICOM multi-frame: ``"frame": k`` (0-based) picks one frame; default the
middle frame (``n_frames // 2``).

NIfTI: ``"axis": 0 | 1 | 2`` (default 2, axial for a volume stored in the usual
RAS/LPS-like order) and one of ``"slice": k`` (0-based index along the axis),
``"position": p`` (0.0 .. 1.0 along the axis), or ``"slices": n`` (n evenly
spaced slices, the centres of n equal bins, giving n images from one part);
default the middle slice. A 4D volume takes ``"frame": k`` for the volume
along the 4th axis (default the middle one).

Orientation convention (NIfTI): slices are returned as stored, with no
reorientation from the affine. The 2D slice keeps the remaining array axes in
order, and the first of them is the image rows (top to bottom), the second the
columns (left to right); e.g. an axial slice ``data[:, :, k]`` becomes an image
of height ``shape[0]`` and width ``shape[1]``. Reorient volumes beforehand
(``nibabel.as_closest_canonical``) for a consistent anatomical orientation.

Every image comes back as an 8-bit PIL RGB image; every failure is a
:class:`~finetune.data.schema.MediaError` naming the file and the fix.

Bounds: the header's image size (DICOM Rows x Columns, a NIfTI slice) is held
against ``data.max_image_pixels`` and the whole (DICOM Rows x Columns x frames,
the NIfTI shape) against ``data.max_volume_voxels`` before any pixel is read;
rescaling and windowing run in float32.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finetune.data.schema import MediaError, check_image_pixels, current_limits, open_regular, require_regular

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MEDICAL_SUFFIXES = DICOM_SUFFIXES + NIFTI_SUFFIXES

#: Window presets as ``(centre, width)`` in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "soft_tissue": (50.0, 400.0),
}
_MINMAX = "minmax"

_INSTALL_HINT = 'pip install -e ".[medical]" (or: pip install pydicom nibabel)'
_KIND_OPTION = "bad_media_option"
_KIND_EXTRA = "missing_extra"
_DICOM_FIX = "re-export it as an uncompressed, complete DICOM file, or remove the sample"
_NIFTI_FIX = "re-save it with nibabel (nib.save), or remove the sample"
# Shown with read errors so that a file that is not DICOM/NIfTI at all is
# understood as read by this extra, not by Pillow.
_VIA = "read with the [medical] extra"


# --- detection ---------------------------------------------------------------

def is_medical(path) -> bool:
    """True for DICOM/NIfTI paths: by extension, or an extension-less DICOM file."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(MEDICAL_SUFFIXES):
        return True
    if p.suffix == "" and p.is_file():
        return _has_dicm_marker(p)
    return False


def _has_dicm_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


# --- public API --------------------------------------------------------------

def read_medical_images(path, options: dict | None = None) -> list[Image.Image]:
    """Decode a DICOM file or NIfTI volume into 8-bit RGB images (see module docs)."""
    path = Path(path)
    opts = _Options(path, options or {})
    _require_exists(path)
    if _is_nifti(path):
        return _nifti_images(path, opts)
    return [_dicom_image(path, opts)]


def medical_image_sizes(path, options: dict | None = None) -> list[tuple[int, int]]:
    """``(width, height)`` of every image :func:`read_medical_images` would produce.

    Read from the DICOM/NIfTI header; pixel data is not decoded.
    """
    path = Path(path)
    opts = _Options(path, options or {})
    _require_exists(path)
    if _is_nifti(path):
        return _nifti_sizes(path, opts)
    return [_dicom_size(path, opts)]


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise MediaError(f"image '{path}' does not exist")
    require_regular(path, "image")


def _check_volume(path: Path, what: str, shape: tuple[int, ...]) -> None:
    """Refuse a volume whose header claims more than data.max_volume_voxels (before any data is read:
    a compressed file of a few MB can expand to tens of GB, and reading one slice may read them all)."""
    voxels = int(np.prod([int(x) for x in shape], dtype=object))
    cap = current_limits().max_volume_voxels
    if voxels > cap:
        raise MediaError(f"{what} '{path}' holds {' x '.join(str(int(x)) for x in shape)} = {voxels:,} voxels (from "
                         f"its header), more than data.max_volume_voxels={cap:,}; it was not read", kind="too_large",
                         fix="crop or downsample the volume (e.g. nibabel.processing.resample_to_output), save the "
                             "slices or frames you need as their own files, or raise data.max_volume_voxels")


# --- options -------------------------------------------------------------------

def _option_error(path: Path, key: str, value: Any, allowed: str, hint: str = "") -> MediaError:
    return MediaError(
        f"'{path}': option \"{key}\": {value!r} is not allowed{hint}; use {allowed}",
        kind=_KIND_OPTION,
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Options:
    """The part options that concern DICOM/NIfTI reading, validated up front."""

    def __init__(self, path: Path, raw: dict) -> None:
        self.path = path
        self.window: tuple[float, float] | str | None = self._window(raw)
        self.frame = self._index(raw, "frame")
        self.slice = self._index(raw, "slice")
        self.axis = 2
        if "axis" in raw:
            if raw["axis"] not in (0, 1, 2) or isinstance(raw["axis"], bool):
                raise _option_error(path, "axis", raw["axis"], "0, 1 or 2 (default 2, axial)")
            self.axis = int(raw["axis"])
        self.position = None
        if "position" in raw:
            p = raw["position"]
            if not _is_number(p) or not 0.0 <= p <= 1.0:
                raise _option_error(path, "position", p, "a number from 0.0 to 1.0")
            self.position = float(p)
        self.slices = None
        if "slices" in raw:
            n = raw["slices"]
            if not _is_int(n) or n < 1:
                raise _option_error(path, "slices", n, "a whole number >= 1")
            self.slices = n
        picks = [k for k in ("slice", "position", "slices") if k in raw]
        if len(picks) > 1:
            raise MediaError(
                f"'{path}': options {', '.join(repr(k) for k in picks)} conflict; "
                "give only one of 'slice', 'position' or 'slices'", kind=_KIND_OPTION)
        if not _is_nifti(path):
            given = [k for k in ("slice", "position", "slices", "axis") if k in raw]
            if given:
                raise MediaError(
                    f"'{path}': option '{given[0]}' applies to NIfTI volumes only; "
                    "for a multi-frame DICOM file use \"frame\": k", kind=_KIND_OPTION)

    def _index(self, raw: dict, key: str) -> int | None:
        if key not in raw:
            return None
        v = raw[key]
        if not _is_int(v) or v < 0:
            raise _option_error(self.path, key, v, "a whole number >= 0 (0-based index)")
        return v

    def _window(self, raw: dict):
        path = self.path
        allowed = (f"one of {', '.join(repr(k) for k in WINDOW_PRESETS)}, '{_MINMAX}', "
                   "or [centre, width] with width > 0")
        if "window" in raw:
            w = raw["window"]
            if isinstance(w, str):
                key = w.strip().lower().replace("-", "_").replace(" ", "_")
                if key == _MINMAX:
                    return _MINMAX
                if key in WINDOW_PRESETS:
                    return WINDOW_PRESETS[key]
                guess = difflib.get_close_matches(key, [*WINDOW_PRESETS, _MINMAX], n=1)
                raise _option_error(path, "window", w, allowed,
                                    f" (did you mean '{guess[0]}'?)" if guess else "")
            if (isinstance(w, (list, tuple)) and len(w) == 2 and all(map(_is_number, w))
                    and w[1] > 0):
                return float(w[0]), float(w[1])
            raise _option_error(path, "window", w, allowed)
        has_c, has_w = "window_center" in raw, "window_width" in raw
        if has_c or has_w:
            if not (has_c and has_w):
                missing = "window_width" if has_c else "window_center"
                raise MediaError(f"'{path}': option '{missing}' is missing; give "
                                 "'window_center' and 'window_width' together", kind=_KIND_OPTION)
            c, w = raw["window_center"], raw["window_width"]
            if not _is_number(c):
                raise _option_error(path, "window_center", c, "a number")
            if not _is_number(w) or w <= 0:
                raise _option_error(path, "window_width", w, "a number > 0")
            return float(c), float(w)
        return None


# --- windowing -----------------------------------------------------------------

def _apply_window(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Map values to uint8 (in float32); ``None`` stretches min-max."""
    values = np.asarray(values, dtype=np.float32)
    if window is None:
        finite = np.isfinite(values)
        if not finite.any():
            return np.zeros(values.shape, dtype=np.uint8)
        lo, hi = (float(values.min()), float(values.max())) if finite.all() else \
            (float(values[finite].min()), float(values[finite].max()))
    else:
        c, w = window
        lo, hi = c - w / 2.0, c + w / 2.0
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    out = values - np.float32(lo)  # a new array: the caller's values stay as they were
    out /= np.float32(hi - lo)
    out *= np.float32(255.0)
    np.clip(out, 0.0, 255.0, out=out)  # +-inf to 255 / 0
    out[np.isnan(out)] = 0.0  # (nan_to_num would hold three masks at once)
    return np.rint(out, out=out).astype(np.uint8)


def _gray_to_rgb(arr8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr8), mode="L").convert("RGB")


# --- DICOM ---------------------------------------------------------------------

def _optional_module(module: str, what: str, path: Path):
    """The optional reader `module` (the [medical] extra), or an error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MediaError(f"reading {what} '{path}' needs {module}: {_INSTALL_HINT}", kind=_KIND_EXTRA) from None


def _pydicom(path: Path):
    return _optional_module("pydicom", "DICOM", path)


def _check_deflated(path: Path) -> None:
    """pydicom inflates a deflated DICOM whole, header and all, before reading a tag: a file of a few MB
    can inflate to gigabytes. Its inflated size is counted first (nothing kept), up to 2 bytes a voxel
    of data.max_volume_voxels."""
    import zlib

    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        with open_regular(path) as f:
            head = f.read(144)
        if len(head) < 144 or head[128:136] != b"DICM\x02\x00\x00\x00":
            return  # no preamble or no group length: pydicom says what it makes of it
        if read_file_meta_info(str(path)).get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
    except Exception:
        return  # an unreadable header is reported by the read itself
    limit = 2 * current_limits().max_volume_voxels
    inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open_regular(path) as f:
        f.seek(144 + int.from_bytes(head[140:144], "little"))
        while not inflate.eof and (chunk := f.read(1 << 20)):
            while chunk:
                try:
                    total += len(inflate.decompress(chunk, 1 << 24))
                except zlib.error:
                    return  # corrupt: the read reports it
                chunk = inflate.unconsumed_tail
                if total > limit:
                    raise MediaError(f"DICOM '{path}' is deflated and inflates to more than {limit:,} bytes (2 bytes "
                                     f"a voxel of data.max_volume_voxels={current_limits().max_volume_voxels:,}); it "
                                     "was not read", kind="too_large",
                                     fix="store it uncompressed or with an image codec (e.g. gdcmconv --raw IN OUT), "
                                         "or raise data.max_volume_voxels")


def _dcmread(path: Path, header_only: bool, checked: bool = False):
    """The dataset (`header_only`: without pixel data); `checked` when _check_deflated already ran."""
    pydicom = _pydicom(path)
    from pydicom.errors import InvalidDicomError

    if not checked:
        _check_deflated(path)
    try:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only)
        except InvalidDicomError:
            # Files without the 128-byte preamble are common; accept them when
            # they parse into something with image attributes.
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only, force=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise InvalidDicomError("not a DICOM file (no 'DICM' preamble and no image "
                                        "attributes)") from None
        if "Rows" not in ds or "Columns" not in ds:
            raise ValueError("the header has no Rows/Columns (not an image, or truncated)")
        rows, cols = int(ds.Rows), int(ds.Columns)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(
            f"cannot read DICOM '{path}' ({_VIA}): {_reason(e)}; fix: {_DICOM_FIX}",
            kind="unreadable_image") from e
    if rows < 1 or cols < 1:
        raise MediaError(f"DICOM '{path}' has no image (Rows={rows}, Columns={cols}); "
                         f"fix: {_DICOM_FIX}", kind="unreadable_image")
    return ds


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _n_frames(ds) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _pick_frame(path: Path, ds, opts: _Options) -> int:
    n = _n_frames(ds)
    if opts.frame is None:
        return n // 2
    if opts.frame >= n:
        raise _option_error(path, "frame", opts.frame,
                            f"0 .. {n - 1} (the file has {n} frame{'s' if n != 1 else ''})")
    return opts.frame


def _check_dicom_size(path: Path, ds) -> None:
    """The header's image against data.max_image_pixels, all its frames against data.max_volume_voxels."""
    rows, cols, frames = int(ds.Rows), int(ds.Columns), _n_frames(ds)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3, 4):
        raise MediaError(f"DICOM '{path}' has SamplesPerPixel={samples}; 1 (grey) or 3 (colour) are read; "
                         f"fix: {_DICOM_FIX}", kind="unreadable_image")
    check_image_pixels(path, cols, rows, "DICOM image")
    if frames > 1:
        _check_volume(path, "DICOM", (frames, rows, cols))


def _dicom_size(path: Path, opts: _Options) -> tuple[int, int]:
    ds = _dcmread(path, header_only=True)
    _check_dicom_size(path, ds)
    _pick_frame(path, ds, opts)  # validates "frame"
    return int(ds.Columns), int(ds.Rows)


def _first(value) -> float | None:
    """The first value of a (possibly multi-valued) DICOM number, or None."""
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            if len(value) == 0:
                return None
            value = value[0]
        v = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return v if np.isfinite(v) else None


def _frame_attr(ds, frame: int, macro: str, attr: str):
    """``attr`` for one frame: per-frame functional group, shared group, then top level.

    Enhanced multi-frame objects keep rescale and window values in functional
    groups (``PixelValueTransformationSequence``, ``FrameVOILUTSequence``).
    """
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame),
                        ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > idx:
            inner = seq[idx].get(macro)
            if inner is not None and len(inner) > 0 and attr in inner[0]:
                return inner[0][attr].value
    return ds.get(attr)


def _dicom_image(path: Path, opts: _Options) -> Image.Image:
    _check_dicom_size(path, _dcmread(path, header_only=True))  # before the pixel data is read
    ds = _dcmread(path, header_only=False, checked=True)
    frame = _pick_frame(path, ds, opts)
    n = _n_frames(ds)
    try:
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise ValueError("the file has no pixel data")
        arr = _decode_frame(ds, frame, n)
    except Exception as e:
        hint = _DICOM_FIX
        if "plugin" in str(e).lower() or "decod" in str(e).lower():
            hint = ("install the [medical] extra's decoders for its transfer syntax (pip install -e \".[medical]\": "
                    "GDCM for JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000, CharLS for JPEG-LS) or "
                    "decompress it (gdcmconv --raw in.dcm out.dcm)")
        raise MediaError(f"cannot decode DICOM pixel data of '{path}' ({_VIA}): {_reason(e)}; "
                         f"fix: {hint}", kind="unreadable_image") from e

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        return _rgb_to_image(rgb, 16 if rgb.dtype.itemsize > 1 else 8)
    if samples >= 3 or arr.ndim == 3:
        return _rgb_to_image(arr, int(ds.get("BitsStored", 8) or 8))

    values = _modality_values(path, ds, arr, frame)
    _require_finite(values, path)

    window = opts.window
    voi_lut = _voi_lut(ds) if window is None else None
    if voi_lut is not None:
        arr8 = _through_voi_lut(path, ds, voi_lut, values)
    else:
        if window is None:
            c = _first(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
            w = _first(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
            if c is not None and w is not None and w > 0:
                window = (c, w)
        arr8 = _apply_window(values, None if window == _MINMAX else window)
    if photometric == "MONOCHROME1":
        arr8 = 255 - arr8
    return _gray_to_rgb(arr8)


# pydicom's LUT functions hold several whole-size temporaries (a mask, an index, the looked-up values):
# they are applied a band of rows at a time, so those stay this size, whatever the image's
_BAND_PIXELS = 1 << 20


def _bands(rows: int, cols: int):
    step = max(1, _BAND_PIXELS // max(1, cols))
    return (slice(r, min(rows, r + step)) for r in range(0, rows, step))


def _lut_functions():
    """pydicom's apply_modality_lut and apply_voi_lut (in pydicom.pixels from pydicom 3)."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _lut_error(path: Path, which: str, e: Exception) -> MediaError:
    return MediaError(f"cannot apply the {which} LUT Sequence of DICOM '{path}' ({_VIA}): {_reason(e)}; "
                      f"fix: {_DICOM_FIX}", kind="unreadable_image")


def _modality_values(path: Path, ds, arr: np.ndarray, frame: int) -> np.ndarray:
    """The frame's stored values in the modality's units (Hounsfield units for CT), in float32.

    A Modality LUT Sequence is looked up by pydicom's apply_modality_lut. Rescale slope and intercept
    are applied here: pydicom's function computes them in a float64 copy of the frame (8 bytes a pixel
    where this takes 4) and reads only the top-level tags, not an enhanced multi-frame file's
    per-frame PixelValueTransformationSequence."""
    if ds.get("ModalityLUTSequence"):
        apply_modality_lut = _lut_functions()[0]
        values = np.empty(arr.shape, dtype=np.float32)
        try:
            for rows in _bands(*arr.shape):
                values[rows] = apply_modality_lut(arr[rows], ds)
        except Exception as e:
            raise _lut_error(path, "Modality", e) from e
        return values
    values = arr.astype(np.float32)  # float32 throughout: half the memory of float64, ample for 16-bit data
    slope = _first(_frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(_frame_attr(ds, frame, "PixelValueTransformationSequence",
                                   "RescaleIntercept"))
    if slope is not None and slope != 0:
        values *= np.float32(slope)
    if intercept is not None:
        values += np.float32(intercept)
    return values


def _voi_lut(ds):
    """The VOI LUT Sequence's first item when it has a descriptor and data, else None: pydicom's
    apply_voi_lut applies it then, in preference to WindowCenter/WindowWidth."""
    seq = ds.get("VOILUTSequence")
    if not seq:
        return None
    item = seq[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return item


def _through_voi_lut(path: Path, ds, item, values: np.ndarray) -> np.ndarray:
    """8-bit grey levels through the file's VOI LUT Sequence: pydicom's apply_voi_lut on the modality
    values, its output range (0 .. 2**bits - 1, the descriptor's third value) shown as 0 .. 255.

    The values reach it as whole numbers within the LUT's input range (it maps those beyond its ends
    to its first and last entries anyway), so that its unsigned index cannot wrap."""
    apply_voi_lut = _lut_functions()[1]
    out = np.empty(values.shape, dtype=np.uint8)
    try:
        entries, first, bits = (int(x) for x in item.LUTDescriptor)
        last = first + (entries or 1 << 16) - 1
        top = float(2 ** bits - 1)
        for rows in _bands(*values.shape):
            index = np.clip(np.floor(values[rows]), first, last).astype(np.int32)
            out[rows] = _apply_window(apply_voi_lut(index, ds), (top / 2, top))
    except Exception as e:
        raise _lut_error(path, "VOI", e) from e
    return out


def _require_finite(values: np.ndarray, path: Path, where: str = "") -> None:
    """NaN or infinite pixel values (float DICOM, NIfTI maps) have no grey level to show: refused."""
    finite = np.isfinite(values)
    if not finite.all():
        at = f" in {where}" if where else ""
        raise MediaError(f"'{path}' holds {finite.size - int(np.count_nonzero(finite))} NaN or infinite pixel value(s){at}; replace them with "
                         "numbers (e.g. numpy.nan_to_num, or the background value) and save it again",
                         kind="non_finite")


def _decode_frame(ds, frame: int, n: int) -> np.ndarray:
    try:
        from pydicom.pixels import pixel_array  # pydicom >= 3: decode one frame only
    except ImportError:
        pixel_array = None
    if pixel_array is not None:
        arr = pixel_array(ds, index=frame if n > 1 else None)
    else:  # pydicom 2.x decodes every frame
        arr = ds.pixel_array
        if n > 1:
            arr = arr[frame]
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    return arr


def _rgb_to_image(arr: np.ndarray, bits: int) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ValueError(f"unexpected colour pixel array shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        top = float(2 ** min(max(bits, 8), 16) - 1)
        arr = np.rint(np.clip(arr.astype(np.float32) * np.float32(255.0 / top), 0, 255)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


# --- NIfTI -----------------------------------------------------------------------

def _nibabel(path: Path):
    return _optional_module("nibabel", "NIfTI", path)


def _nifti_load(path: Path, keep_open: bool = False):
    """(image, shape as 3D or 4D); `keep_open` keeps one file handle for every read of the data, so a
    gzip stream read in increasing order is decompressed once, not from its start for each read."""
    nib = _nibabel(path)
    try:
        img = nib.load(str(path), keep_file_open=keep_open) if keep_open else nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:
        raise MediaError(f"cannot read NIfTI '{path}' ({_VIA}): {_reason(e)}; fix: {_NIFTI_FIX}",
                         kind="unreadable_image") from e
    if len(shape) < 2 or len(shape) > 4 or 0 in shape:
        raise MediaError(f"NIfTI '{path}' has shape {shape}; expected a 2D, 3D or 4D image; "
                         f"fix: {_NIFTI_FIX}", kind="unreadable_image")
    if len(shape) == 2:
        shape = shape + (1,)
    return img, shape


def _nifti_plan(path: Path, shape: tuple[int, ...], opts: _Options):
    """``(volume index or None, slice indices along opts.axis)``, after the header's shape is held
    against the caps (a slice against data.max_image_pixels, the volume against data.max_volume_voxels)."""
    rows, cols = _nifti_slice_shape(shape, opts.axis)
    check_image_pixels(path, cols, rows, "NIfTI slice of")
    _check_volume(path, "NIfTI", shape)
    volume = None
    if len(shape) == 4:
        n_vol = shape[3]
        volume = n_vol // 2 if opts.frame is None else opts.frame
        if volume >= n_vol:
            raise _option_error(path, "frame", opts.frame, f"0 .. {n_vol - 1} (the 4D volume "
                                f"has {n_vol} volumes)")
    elif opts.frame is not None:
        raise MediaError(f"'{path}': option 'frame' selects a volume of a 4D NIfTI, but this "
                         f"image has shape {shape}; use \"slice\": k", kind=_KIND_OPTION)
    n = shape[opts.axis]
    if opts.slice is not None:
        if opts.slice >= n:
            raise _option_error(path, "slice", opts.slice,
                                f"0 .. {n - 1} (axis {opts.axis} has {n} slices)")
        idx = [opts.slice]
    elif opts.position is not None:
        idx = [int(round(opts.position * (n - 1)))]
    elif opts.slices is not None:
        k = min(opts.slices, n)
        # Centres of k equal bins: never the (often empty) end slices, and
        # k=1 is the default middle slice.
        idx = [min(int((i + 0.5) * n / k), n - 1) for i in range(k)]
    else:
        idx = [n // 2]
    return volume, idx


def _nifti_slice_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    rows, cols = (s for a, s in enumerate(shape[:3]) if a != axis)
    return rows, cols


def _nifti_sizes(path: Path, opts: _Options) -> list[tuple[int, int]]:
    _, shape = _nifti_load(path)
    _, idx = _nifti_plan(path, shape, opts)
    rows, cols = _nifti_slice_shape(shape, opts.axis)
    return [(cols, rows)] * len(idx)


def _nifti_images(path: Path, opts: _Options) -> list[Image.Image]:
    img, shape = _nifti_load(path, keep_open=True)
    volume, idx = _nifti_plan(path, shape, opts)
    window = None if opts.window == _MINMAX else opts.window
    out = []
    try:
        proxy = img.dataobj
        ndim = len(img.shape)
        if ndim == 2:
            slices = {idx[0]: _scaled_slice(proxy, (slice(None), slice(None)))}
        elif opts.axis == 2:
            # each slice is one contiguous block, read in increasing order: one pass through the file
            slices = {k: _scaled_slice(proxy, (slice(None), slice(None), k) + ((volume,) if ndim == 4 else ()))
                      for k in idx}
        else:
            slices = _slices_across(proxy, shape, opts.axis, idx, volume if ndim == 4 else None)
        for k in idx:
            data = slices[k]
            if data.ndim != 2:
                raise ValueError(f"unexpected slice shape {data.shape}")
            _require_finite(data, path, f"slice {k}")
            out.append(_gray_to_rgb(_apply_window(data, window)))
    except MediaError:
        raise
    except MemoryError:
        raise MediaError(f"reading NIfTI '{path}' ran out of memory", kind="out_of_memory",
                         fix="crop or downsample the volume, or lower data.max_volume_voxels") from None
    except Exception as e:
        raise MediaError(f"cannot decode NIfTI '{path}' ({_VIA}): {_reason(e)}; "
                         f"fix: {_NIFTI_FIX}", kind="unreadable_image") from e
    return out  # the file handle kept open for the reads closes with the image


_SLAB_BYTES = 64 << 20


def _slices_across(proxy, shape: tuple[int, ...], axis: int, idx: list[int], volume: int | None) -> dict:
    """Slices along axis 0 or 1, read as slabs of whole axial planes in file order (each such slice
    touches every plane, so reading it alone reads the whole volume, once per slice)."""
    nx, ny, nz = shape[:3]
    plane = nx * ny * max(1, np.dtype(proxy.dtype).itemsize)
    step = max(1, _SLAB_BYTES // plane)
    out: dict[int, np.ndarray] = {}
    for z0 in range(0, nz, step):
        sl = (slice(None), slice(None), slice(z0, min(nz, z0 + step))) + ((volume,) if volume is not None else ())
        slab = _scaled_slice(proxy, sl)
        for k in idx:
            part = slab[k, :, :] if axis == 0 else slab[:, k, :]
            if k not in out:
                out[k] = np.empty((part.shape[0], nz), dtype=np.float32)
            out[k][:, z0:z0 + part.shape[1]] = part
    return out


def _scaled_slice(proxy, sl: tuple) -> np.ndarray:
    """One slice (or slab) with scl_slope/scl_inter applied in float32. nibabel's own slicing scales in float64
    (its slope is a float64 scalar); the stored values are read unscaled and scaled here instead."""
    raw = getattr(proxy, "_get_unscaled", None)
    slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
    if raw is None or slope is None or inter is None:  # another proxy type: nibabel's slicing
        return np.asarray(proxy[sl]).astype(np.float32, copy=False)
    data = np.asarray(raw(slicer=sl)).astype(np.float32)
    slope, inter = float(np.asarray(slope)), float(np.asarray(inter))
    if slope != 1.0:
        data *= np.float32(slope)
    if inter != 0.0:
        data += np.float32(inter)
    return data
