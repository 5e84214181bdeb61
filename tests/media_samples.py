"""Media and samples the tests build: images, a WAV, a folder of frames and an MP4 with sound
(the `media_dir` fixture in conftest.py writes them), a sample around them, the modality mixes,
a minimal DICOM file, and the reference greedy decoding without a cache."""

from __future__ import annotations

import numpy as np
import torch
import soundfile as sf
from PIL import Image

from finetune.data.schema import parse_sample


def write_media(tmp_path):
    """Two images, a WAV, a folder of frames and an MP4 with sound, written into the folder."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((150, 220)) * 255).astype("uint8")).save(tmp_path / "a.png")
    Image.fromarray((rng.random((90, 60, 3)) * 255).astype("uint8")).save(tmp_path / "b.png")
    sf.write(tmp_path / "a.wav", (rng.standard_normal(24000) * 0.1).astype(np.float32), 16000)
    (tmp_path / "vid").mkdir()
    for i in range(5):
        Image.fromarray((rng.random((100, 120, 3)) * 255).astype("uint8")).save(tmp_path / "vid" / f"{i:03d}.png")
    write_video(tmp_path / "av.mp4", seconds=2.5)
    return tmp_path


def write_video(path, seconds: float = 3.0, fps: int = 4, sound: bool = True, freq: float = 440.0,
                size=(64, 48), sr: int = 16000):
    """An MP4 written with PyAV: random frames, and (with `sound`) a sine tone in an AAC track."""
    import fractions

    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        v = out.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        a = None
        if sound:
            a = out.add_stream("aac", rate=sr)
            a.layout = "mono"
        for _ in range(int(seconds * fps)):
            img = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
            out.mux(v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(v.encode())
        if a is not None:
            t = np.arange(int(seconds * sr)) / sr
            wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
            step = a.codec_context.frame_size or 1024
            for start in range(0, len(wave), step):
                frame = av.AudioFrame.from_ndarray(wave[None, start:start + step], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = sr, start, fractions.Fraction(1, sr)
                out.mux(a.encode(frame))
            out.mux(a.encode())
    return path


def sample(media_dir, user_parts, answer="Yes. A lesion.", extra_turns=()):
    msgs = [{"role": "system", "content": "You are a radiology assistant."},
            {"role": "user", "content": user_parts},
            {"role": "assistant", "content": answer}, *extra_turns]
    return parse_sample({"messages": msgs, "answer": "yes"}, source="t.jsonl", line=1, base_dir=media_dir)


MIXES = {
    "text": [{"type": "text", "text": "What does MRI stand for?"}],
    "image": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Is there a lesion?"}],
    "audio": [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "Listen."}],
    "video": [{"type": "video", "path": "vid"}, {"type": "text", "text": "Describe."}],
    "two_images": [{"type": "image", "path": "a.png"}, {"type": "image", "path": "b.png"},
                   {"type": "text", "text": "Compare prior and current."}],
    "all": [{"type": "image", "path": "b.png"}, {"type": "audio", "path": "a.wav"},
            {"type": "video", "path": "vid"}, {"type": "text", "text": "All of it."}],
    # a video file with a sound track, read with it where the family can (Family.audio_in_video)
    "video_sound": [{"type": "video", "path": "av.mp4", "use_audio_in_video": True},
                    {"type": "text", "text": "What do you hear?"}],
}


def write_dicom(path, arr, *, photometric="MONOCHROME2", bits_stored=12, **tags):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    """A minimal uncompressed DICOM file; ``arr`` is (rows, cols), (frames, rows, cols) or RGB."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    rgb = photometric == "RGB"
    if rgb:
        ds.Rows, ds.Columns = arr.shape[:2]
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    else:
        ds.Rows, ds.Columns = arr.shape[-2:]
        ds.SamplesPerPixel = 1
        if arr.ndim == 3:
            ds.NumberOfFrames = arr.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@torch.no_grad()
def greedy_without_cache(model, fam, proc, s, rope, n: int) -> list[int]:
    """The reference: n greedy steps, each a full forward over prompt + answer so far."""
    enc = fam.encode(s, proc, for_generation=True, rope=rope)
    ids = enc.input_ids.tolist()
    out: list[int] = []
    for _ in range(n):
        enc.input_ids = torch.tensor(ids + out)
        enc.labels = torch.full_like(enc.input_ids, -100)
        if rope is not None:  # M-RoPE: the new tokens continue the prompt's text positions
            enc.position_ids = rope(enc.input_ids, enc.media)
        else:
            enc.position_ids = torch.arange(len(enc.input_ids))
        batch = fam.collate_padded([enc], proc.pad_id)
        batch.pop("labels")
        logits = model(**batch, use_cache=False).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok == proc.eos_id:
            break
    return out
