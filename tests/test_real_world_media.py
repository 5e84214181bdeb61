"""Media as real sources export them, read as a viewer shows them: EXIF-rotated phone photos
upright, NaN/inf in float audio and images refused at their line, compressed DICOM transfer
syntaxes decoded by the [medical] extra."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from finetune.data import media
from finetune.data.check import check_dataset
from finetune.data.media import MediaError

pydicom = pytest.importorskip("pydicom")

from media_samples import write_dicom  # noqa: E402


def test_exif_rotated_jpeg_is_read_upright_and_counted_upright(tmp_path, tiny_qwen):
    stored = np.zeros((60, 140, 3), np.uint8)  # stored 140 wide, 60 high; left third red
    stored[:, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)

    img = media.load_image(path)
    assert img.size == (60, 140)  # displayed: 60 wide, 140 high
    arr = np.asarray(img).astype(int)
    assert arr[:30, :, 0].mean() > 200 and arr[-30:, :, 0].mean() < 60  # the red band is now on top
    assert media.image_size(path) == (60, 140)  # header size as displayed: the token plan agrees

    from finetune.data.schema import parse_sample

    fam, loaded = tiny_qwen
    s = parse_sample({"messages": [{"role": "user", "content": [{"type": "image", "path": "photo.jpg"}]},
                                   {"role": "assistant", "content": "Yes."}]}, source="t.jsonl", line=1,
                     base_dir=tmp_path)
    enc = fam.encode(s, loaded.processor)
    assert fam.count_tokens(s, loaded.processor) == enc.num_tokens
    t, h, w = enc.media["image_grid_thw"][0].tolist()
    assert h > w  # portrait, as shown


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _turn(part):
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]},
                         {"role": "assistant", "content": "No."}]}


def test_nan_audio_and_images_are_refused_at_their_line(tmp_path):
    wave = (np.sin(np.arange(16000) / 10) * 0.1).astype(np.float32)
    sf.write(tmp_path / "ok.wav", wave, 16000, subtype="FLOAT")
    wave[8000] = np.nan
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    f = np.ones((40, 40), np.float32)
    Image.fromarray(f, mode="F").save(tmp_path / "ok.tif")
    f[3, 3] = np.inf
    Image.fromarray(f, mode="F").save(tmp_path / "inf.tif")
    data = _jsonl(tmp_path / "d.jsonl", [_turn({"type": "audio", "path": "ok.wav"}),
                                         _turn({"type": "audio", "path": "nan.wav"}),
                                         _turn({"type": "image", "path": "ok.tif"}),
                                         _turn({"type": "image", "path": "inf.tif"})])
    report = check_dataset([data])
    assert [(e.line, e.kind) for e in report.errors] == [(2, "non_finite"), (4, "non_finite")]
    assert "NaN or infinite sample(s), the first at 0.500 s" in str(report.errors[0])
    assert str(report.errors[0]).startswith(f"{data}:2: messages[0].content[0].path:")
    with pytest.raises(MediaError, match="NaN or infinite"):
        media.load_audio(tmp_path / "nan.wav")


def _compressed(tmp_path, name, syntax, arr):
    """An uncompressed CT written by the test helper, then compressed: by pydicom's own encoders
    (JPEG-LS with CharLS, RLE natively), JPEG 2000 by Pillow's OpenJPEG and encapsulated."""
    import io

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    path = write_dicom(tmp_path / f"{name}.dcm", arr, WindowCenter=1000, WindowWidth=2000)
    ds = pydicom.dcmread(str(path))
    if syntax == JPEG2000Lossless:
        buf = io.BytesIO()
        Image.fromarray(arr).convert("I;16").save(buf, format="JPEG2000", irreversible=False)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)
    ds.save_as(str(path), enforce_file_format=True)
    assert pydicom.dcmread(str(path)).file_meta.TransferSyntaxUID == syntax
    return path


@pytest.mark.parametrize("syntax", ["JPEGLSLossless", "JPEG2000Lossless", "RLELossless"])
def test_compressed_dicom_is_decoded_like_the_uncompressed_one(tmp_path, syntax):
    from pydicom import uid

    from finetune.data.medical import read_medical_images

    arr = (np.add.outer(np.arange(48), np.arange(64)) * 30).astype(np.uint16)  # 0..3300, a 12-bit ramp
    plain = write_dicom(tmp_path / "plain.dcm", arr, WindowCenter=1000, WindowWidth=2000)
    packed = _compressed(tmp_path, syntax, getattr(uid, syntax), arr)
    want = np.asarray(read_medical_images(plain)[0])
    got = np.asarray(read_medical_images(packed)[0])
    assert np.array_equal(got, want)


def test_jpeg_baseline_dicom_from_a_camera_is_decoded(tmp_path):
    """JPEG baseline (secondary capture, endoscopy, dermatology): encapsulated JPEG frames."""
    import io

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from finetune.data.medical import read_medical_images

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 40, 40)
    path = write_dicom(tmp_path / "cam.dcm", rgb, photometric="RGB", bits_stored=8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    ds = pydicom.dcmread(str(path))
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(str(path), enforce_file_format=True)
    got = np.asarray(read_medical_images(path)[0]).astype(int)
    assert got.shape == (32, 48, 3)
    assert abs(got[:, :20, 0].mean() - 200) < 25 and got[:, 28:].mean() < 25  # red on the left, black right


def test_nan_in_a_float_dicom_or_nifti_is_refused(tmp_path):
    from finetune.data.medical import read_medical_images

    nib = pytest.importorskip("nibabel")
    vol = np.ones((8, 8, 4), np.float32)
    vol[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "map.nii.gz"))
    with pytest.raises(MediaError, match=r"NaN or infinite pixel value\(s\) in slice 2"):
        read_medical_images(tmp_path / "map.nii.gz", {"slice": 2})
    assert len(read_medical_images(tmp_path / "map.nii.gz", {"slice": 1})) == 1  # other slices are fine
    report = check_dataset([_jsonl(tmp_path / "d.jsonl", [_turn({"type": "image", "path": "map.nii.gz",
                                                                 "slice": 2})])])
    assert [e.kind for e in report.errors] == ["non_finite"]
