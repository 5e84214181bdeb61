"""Resource bombs, built in code and small on disk (issue 25): each claims or expands to far more
memory or time than `data check` may spend on one sample.

Every builder writes one file (or a folder) and returns its path. `write_bomb_set(folder)` writes one
dataset per bomb (`<name>.jsonl`: a good sample, the bomb's sample, another good sample) and
returns {name: (jsonl path, expected kind, a word the error must hold)}.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


# --- images ---------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(path: Path, width: int, height: int, *, bit_depth: int = 8, full: bool = True) -> Path:
    """A grey PNG of `width` x `height` zero pixels; `full=False` writes the header and a token IDAT
    (a header that lies about the data behind it)."""
    row = bytes(1 + width * bit_depth // 8)  # filter byte + the row
    z = zlib.compressobj(9)
    idat = []
    if full:
        block = row * max(1, (32 << 20) // len(row))
        rows_per_block = len(block) // len(row)
        left = height
        while left > 0:
            n = min(left, rows_per_block)
            idat.append(z.compress(block if n == rows_per_block else row * n))
            left -= n
    else:
        idat.append(z.compress(row))
    idat.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(idat))
                     + _chunk(b"IEND", b""))
    return path


def jpeg_header(path: Path, width: int, height: int) -> Path:
    """A baseline JPEG whose frame header claims `width` x `height` (a few bytes of scan follow)."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    path.write_bytes(b"\xff\xd8" + sof + sos + bytes(64) + b"\xff\xd9")
    return path


def gif_header(path: Path, width: int, height: int) -> Path:
    """A GIF whose logical screen and one image claim `width` x `height`."""
    body = (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00" + b"\x3b")
    path.write_bytes(body)
    return path


# --- medical --------------------------------------------------------------------------------------
def rle_dicom(path: Path, n: int) -> Path:
    """An 8-bit RLE Lossless DICOM of n x n zero pixels: 2 bytes per 128 pixels on disk."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

    total = n * n
    runs, rest = divmod(total, 128)
    segment = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest > 1 else (b"\x00\x00" if rest else b""))
    if len(segment) % 2:
        segment += b"\x00"
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + segment
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows = ds.Columns = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)
    return path


def dicom_header_only(path: Path, rows: int, cols: int, frames: int = 1, samples: int = 1) -> Path:
    """An uncompressed DICOM whose header claims rows x cols x frames (x samples) with 16 bytes of pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(16)
    ds["PixelData"].VR = "OW"
    ds.save_as(str(path), enforce_file_format=True)
    return path


def deflated_dicom(path: Path, inflated_bytes: int) -> Path:
    """A Deflated Explicit VR Little Endian DICOM: a small image, then a private OB element of zeros, the
    whole dataset deflated to a few MB (pydicom inflates all of it before reading a tag)."""
    import io

    from pydicom.filewriter import write_file_meta_info
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)

    def el(group, elem, vr, value: bytes) -> bytes:
        if vr in (b"OB", b"OW", b"UN"):
            return struct.pack("<HH", group, elem) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    body = (el(0x0028, 0x0002, b"US", struct.pack("<H", 1)) + el(0x0028, 0x0004, b"CS", b"MONOCHROME2 ")
            + el(0x0028, 0x0010, b"US", struct.pack("<H", 8)) + el(0x0028, 0x0011, b"US", struct.pack("<H", 8))
            + el(0x0028, 0x0100, b"US", struct.pack("<H", 8)) + el(0x0028, 0x0101, b"US", struct.pack("<H", 8))
            + el(0x0028, 0x0102, b"US", struct.pack("<H", 7)) + el(0x0028, 0x0103, b"US", struct.pack("<H", 0))
            + el(0x0029, 0x0010, b"LO", b"BOMB") + struct.pack("<HH", 0x0029, 0x1000) + b"OB\x00\x00"
            + struct.pack("<I", inflated_bytes))
    # after a full flush the compressor refers back to nothing, so one compressed block of zeros,
    # repeated, is a valid stream: gigabytes are written in a second
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(body) + z.flush(zlib.Z_FULL_FLUSH)]
    block = 64 << 20
    zeros = z.compress(bytes(block)) + z.flush(zlib.Z_FULL_FLUSH)
    out += [zeros] * (inflated_bytes // block)
    out.append(z.compress(bytes(inflated_bytes % block) + el(0x7FE0, 0x0010, b"OB", bytes(64))))
    out.append(z.flush())
    path.write_bytes(head.getvalue() + b"".join(out))
    return path


def nifti_gz(path: Path, shape: tuple[int, ...], *, dtype=np.int16, full: bool = True) -> Path:
    """A gzipped NIfTI of zeros with `shape`; its data is written as repeated gzip members of one
    compressed block, so a volume of gigabytes takes a second. `full=False` writes the header only."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    head = hdr.binaryblock + b"\x00" * 4
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(gzip.compress(head, 1))
        if full:
            block = 64 << 20
            member = gzip.compress(bytes(block), 9)
            for _ in range(nbytes // block):
                f.write(member)
            if nbytes % block:
                f.write(gzip.compress(bytes(nbytes % block), 9))
    return path


# --- audio ----------------------------------------------------------------------------------------
def flac_silence(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> Path:
    """Silence as FLAC: about 180 kB per hour at 16 kHz."""
    import soundfile as sf

    left = int(seconds * rate)
    block = np.zeros((min(left, rate * 600), channels), dtype=np.int16)
    with sf.SoundFile(str(path), "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    return path


def flac_total_samples(path: Path, total: int) -> Path:
    """Rewrite the total-samples field of a FLAC file's STREAMINFO (0 = unknown length): a header
    that claims another length than the stream holds."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    word = int.from_bytes(data[18:26], "big")  # rate(20) channels(3) bits(5) total samples(36)
    word = (word & ~((1 << 36) - 1)) | (total & ((1 << 36) - 1))
    data[18:26] = word.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def wav(path: Path, *, rate: int, n_samples: int, channels: int = 1, data_bytes: int | None = None) -> Path:
    """A 16-bit PCM WAV written by hand, so its header may claim any rate; `data_bytes` overrides the
    data chunk's declared size (a header that lies about the length)."""
    data = bytes(2 * channels * n_samples)
    declared = len(data) if data_bytes is None else data_bytes
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * channels * 2) & 0xFFFFFFFF, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", declared) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", (len(body)) & 0xFFFFFFFF) + body)
    return path


# --- video ----------------------------------------------------------------------------------------
def mp4(path: Path, n_frames: int, size: int = 16, fps: int = 30) -> Path:
    """An MPEG-4 video of `n_frames` black `size` x `size` frames (about 13 bytes a frame)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((size, size, 3), np.uint8), format="rgb24")
        for _ in range(n_frames):
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# --- text -----------------------------------------------------------------------------------------
def long_line(n_bytes: int) -> str:
    """A sample whose user text makes the line about `n_bytes` long."""
    text = "lorem ipsum " * (n_bytes // 12)
    return json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]})


def deep_line(depth: int) -> str:
    """A line nested `depth` lists deep."""
    return "[" * depth + "]" * depth


def deep_sample(depth: int) -> str:
    """A valid sample with an extra key nested `depth` lists deep (within what json.loads can read)."""
    return ('{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}], '
            '"extra": ' + "[" * depth + "]" * depth + "}")


# --- the set --------------------------------------------------------------------------------------
def good_sample(image: str = "ok.png") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "path": image},
                                                      {"type": "text", "text": "Is there a lesion?"}]},
                         {"role": "assistant", "content": "No."}], "answer": "no"}


def media_sample(kind: str, path: str, text: str = "Describe it.") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": kind, "path": path}, {"type": "text", "text": text}]},
                         {"role": "assistant", "content": "Nothing unusual."}]}


def write_dataset(path: Path, lines: list) -> Path:
    """A JSONL file: good sample, each given line (an object or raw text), good sample."""
    with open(path, "w", encoding="utf-8") as f:
        for obj in [good_sample(), *lines, good_sample()]:
            f.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    return path


def write_ok_image(folder: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(folder / "ok.png")


def mkfifo(path: Path) -> Path:
    os.mkfifo(path)
    return path
