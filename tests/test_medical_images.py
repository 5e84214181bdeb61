"""DICOM and NIfTI image parts (finetune.data.medical, the [medical] extra)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.dataset import Dataset  # noqa: E402

from finetune.models import load_spec
from finetune.data import media  # noqa: E402
from finetune.data.check import check_dataset  # noqa: E402
from finetune.data.media import MediaError  # noqa: E402
from finetune.data.medical import (  # noqa: E402
    WINDOW_PRESETS,
    is_medical,
    medical_image_sizes,
    read_medical_images,
)
from finetune.data.schema import Part  # noqa: E402


from media_samples import write_dicom  # noqa: E402


def gray(im) -> np.ndarray:
    a = np.asarray(im)
    assert im.mode == "RGB" and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0].astype(int)


def lin(hu, centre, width):
    """The expected 8-bit value of ``hu`` under a window, computed by hand."""
    lo, hi = centre - width / 2, centre + width / 2
    return int(np.rint(np.clip((hu - lo) / (hi - lo) * 255, 0, 255)))


# Stored values (uint16, 12 bits) and their HU with intercept -1024:
# 424 -> -600 (lung centre), 0 -> -1024, 2000 -> 976, 4095 -> 3071.
CT_STORED = np.array([[424, 0, 2000], [4095, 1064, 1074]], dtype=np.uint16)
CT_HU = CT_STORED.astype(float) - 1024


@pytest.fixture
def ct(tmp_path):
    return write_dicom(tmp_path / "ct.dcm", CT_STORED, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=[40, 400], WindowWidth=[400, 1500])


def test_lung_preset_windowing(ct):
    out = gray(read_medical_images(ct, {"window": "lung"})[0])
    assert out[0, 0] in (127, 128)  # HU -600 is the lung window's centre
    assert out[0, 1] == 55  # (-1024 + 1350) / 1500 * 255 = 55.4
    assert out[0, 2] == 255 and out[1, 0] == 255  # above the window
    expected = [[lin(h, -600, 1500) for h in row] for row in CT_HU]
    assert out.tolist() == expected


def test_window_from_file_first_value_and_options_priority(ct):
    # No option: WindowCenter/WindowWidth's first values (40, 400).
    out = gray(read_medical_images(ct, {})[0])
    assert out[0, 0] == 0 and out[0, 2] == 255  # -600 below, 976 above
    assert out[1, 1] == lin(40, 40, 400) and out[1, 2] == lin(50, 40, 400)
    # [centre, width] and window_center/window_width override the file.
    a = gray(read_medical_images(ct, {"window": [0, 2000]})[0])
    b = gray(read_medical_images(ct, {"window_center": 0, "window_width": 2000})[0])
    assert a.tolist() == b.tolist() == [[lin(h, 0, 2000) for h in row] for row in CT_HU]
    # The preset wins over window_center/window_width.
    c = gray(read_medical_images(ct, {"window": "Bone", "window_center": 0, "window_width": 1})[0])
    assert c.tolist() == [[lin(h, 400, 1800) for h in row] for row in CT_HU]


def test_min_max_without_window_tags_and_signed_int16(tmp_path):
    arr = np.array([[-1000, 0], [500, 1000]], dtype=np.int16)
    p = write_dicom(tmp_path / "s.dcm", arr, RescaleSlope=2, RescaleIntercept=-10)
    out = gray(read_medical_images(p, {})[0])
    # HU = 2 * v - 10: -2010 .. 1990, min-max -> 0 .. 255
    assert out[0, 0] == 0 and out[1, 1] == 255
    assert out[0, 1] == lin(-10, -10, 4000) and out[1, 0] == lin(990, -10, 4000)
    # Rescale applies before the window: HU -10 is the centre of [-10, 100].
    assert gray(read_medical_images(p, {"window": [-10, 100]})[0])[0, 1] in (127, 128)


def test_monochrome1_inverted(tmp_path):
    p = write_dicom(tmp_path / "m1.dcm", CT_STORED, photometric="MONOCHROME1",
                    RescaleSlope=1, RescaleIntercept=-1024)
    m1 = gray(read_medical_images(p, {"window": "lung"})[0])
    expected = [[255 - lin(h, -600, 1500) for h in row] for row in CT_HU]
    assert m1.tolist() == expected
    assert m1[0, 2] == 0  # above the window is black in MONOCHROME1


def test_multi_frame_selection(tmp_path):
    frames = np.stack([np.full((4, 5), 100 * (k + 1), dtype=np.uint16) for k in range(5)])
    frames[:, 0, 0] = 0  # a fixed dark pixel so min-max has a range
    p = write_dicom(tmp_path / "mf.dcm", frames)
    middle = gray(read_medical_images(p, {"window": [0, 1020]})[0])
    assert middle[1, 1] == lin(300, 0, 1020)  # default: frame 5 // 2 = 2
    first = gray(read_medical_images(p, {"frame": 0, "window": [0, 1020]})[0])
    assert first[1, 1] == lin(100, 0, 1020)
    assert read_medical_images(p, {"frame": 4})[0].size == (5, 4)
    with pytest.raises(MediaError, match=r'"frame".*0 \.\. 4'):
        read_medical_images(p, {"frame": 5})
    with pytest.raises(MediaError, match="NIfTI volumes only"):
        read_medical_images(p, {"slice": 1})


def test_rgb_dicom_passthrough(tmp_path):
    arr = np.zeros((3, 4, 3), dtype=np.uint8)
    arr[..., 0] = 200
    arr[1, 2] = (10, 20, 30)
    p = write_dicom(tmp_path / "rgb.dcm", arr, photometric="RGB", bits_stored=8)
    out = np.asarray(read_medical_images(p, {"window": "lung"})[0])
    assert out.shape == (3, 4, 3) and (out == arr).all()


def test_sizes_match_decoded_images(ct, tmp_path):
    p = write_dicom(tmp_path / "wide.dcm", np.zeros((3, 7), dtype=np.uint16))
    for path in (ct, p):
        assert medical_image_sizes(path, {}) == [im.size for im in read_medical_images(path, {})]
    assert medical_image_sizes(p, {}) == [(7, 3)]


@pytest.fixture
def volume(tmp_path):
    # data[i, j, k] = k * 100 - 1000 + i: slice k along axis 2 has a known level.
    shape = (6, 8, 10)
    data = np.zeros(shape, dtype=np.int16)
    data += (np.arange(10) * 100 - 1000).astype(np.int16)[None, None, :]
    data += np.arange(6, dtype=np.int16)[:, None, None]
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path, data


def test_nifti_default_middle_axial_slice_and_orientation(volume):
    path, data = volume
    [im] = read_medical_images(path, {})
    # Axial slice data[:, :, 5]: rows = axis 0 (6), columns = axis 1 (8).
    assert im.size == (8, 6)
    out = gray(im)
    assert out[0, 0] == 0 and out[5, 0] == 255  # min-max over the slice, rows follow axis 0
    assert medical_image_sizes(path, {}) == [(8, 6)]


def test_nifti_slice_axis_position_and_window(volume):
    path, data = volume
    im = gray(read_medical_images(path, {"slice": 3, "window": [-700, 200]})[0])
    assert im[0, 0] == lin(-700, -700, 200) and im[5, 0] == lin(-695, -700, 200)
    im = gray(read_medical_images(path, {"position": 1.0, "window": "bone"})[0])
    assert im[0, 0] == lin(-100, 400, 1800)  # last slice, k = 9
    [sag] = read_medical_images(path, {"axis": 0, "slice": 2, "window": [0, 4000]})
    assert sag.size == (10, 8)  # rows = axis 1 (8), columns = axis 2 (10)
    assert gray(sag)[0, 9] == lin(9 * 100 - 1000 + 2, 0, 4000)  # data[2, 0, 9]
    assert medical_image_sizes(path, {"axis": 1}) == [(10, 6)]
    with pytest.raises(MediaError, match=r'"slice".*0 \.\. 9'):
        read_medical_images(path, {"slice": 10})
    with pytest.raises(MediaError, match=r'"axis".*0, 1 or 2'):
        read_medical_images(path, {"axis": 3})


def test_nifti_slices_gives_several_images(volume):
    path, _ = volume
    ims = read_medical_images(path, {"slices": 3, "window": [-1000, 2000]})
    assert len(ims) == 3
    # Centres of 3 bins over 10 slices: k = 1, 5, 8.
    assert [gray(im)[0, 0] for im in ims] == [lin(h, -1000, 2000) for h in (-900, -500, -200)]
    assert medical_image_sizes(path, {"slices": 3}) == [im.size for im in ims]
    part = Part(type="image", path=path, extra={"slices": 3})
    assert len(media.load_images(part)) == 3 and media.image_sizes(part) == [(8, 6)] * 3


def test_nifti_scaling_applied(tmp_path):
    data = np.array([[[0], [10]], [[20], [30]]], dtype=np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, -50.0)
    path = tmp_path / "s.nii"
    nib.save(img, str(path))
    # Stored 0..30 -> -50..10; window [-20, 60] puts -50 at 0 and 10 at 255.
    out = gray(read_medical_images(path, {"window": [-20, 60]})[0])
    assert out.tolist() == [[0, lin(-30, -20, 60)], [lin(-10, -20, 60), 255]]


def test_bad_options_are_clear(ct, volume):
    with pytest.raises(MediaError, match=r"option \"window\": 'lungs'.*did you mean 'lung'.*'mediastinum'"):
        read_medical_images(ct, {"window": "lungs"})
    with pytest.raises(MediaError, match="ct.dcm") as e:
        medical_image_sizes(ct, {"window": "nope"})
    assert e.value.kind == "bad_media_option"
    with pytest.raises(MediaError, match="window_width"):
        read_medical_images(ct, {"window_center": 40})
    with pytest.raises(MediaError, match="window"):
        read_medical_images(ct, {"window": [40, 0]})
    with pytest.raises(MediaError, match="conflict"):
        read_medical_images(volume[0], {"slice": 1, "slices": 2})
    with pytest.raises(MediaError, match='"position"'):
        read_medical_images(volume[0], {"position": 1.5})
    assert set(WINDOW_PRESETS) >= {"lung", "mediastinum", "bone", "brain", "abdomen", "liver"}
    assert WINDOW_PRESETS["lung"] == (-600, 1500) and WINDOW_PRESETS["liver"] == (60, 160)


def test_truncated_and_corrupt_files(ct, volume, tmp_path):
    raw = ct.read_bytes()
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(raw[:-5])
    assert medical_image_sizes(trunc, {}) == [(3, 2)]  # the header is intact
    with pytest.raises(MediaError, match=r"trunc\.dcm.*fix:") as e:
        media.load_image(trunc)
    assert "\n" not in str(e.value)
    short = tmp_path / "short.dcm"
    short.write_bytes(raw[:150])
    with pytest.raises(MediaError, match=r"short\.dcm"):
        media.image_size(short)
    vol = tmp_path / "cut.nii.gz"
    vol.write_bytes(volume[0].read_bytes()[:120])
    with pytest.raises(MediaError, match=r"cut\.nii\.gz.*fix:"):
        media.load_image(vol)
    with pytest.raises(MediaError, match="does not exist"):
        read_medical_images(tmp_path / "missing.dcm", {})


def test_media_entry_points(ct, tmp_path):
    assert is_medical(ct) and is_medical(tmp_path / "a.NII.GZ") and not is_medical(tmp_path / "a.png")
    plain = tmp_path / "IM0001"  # extension-less DICOM, recognised by its DICM marker
    plain.write_bytes(ct.read_bytes())
    assert is_medical(plain)
    assert media.image_size(plain) == (3, 2) and media.load_image(plain).size == (3, 2)
    part = Part(type="image", path=ct, extra={"window": "lung"})
    assert gray(media.load_images(part)[0])[0, 0] in (127, 128)
    assert media.image_sizes(part) == [(3, 2)]


def test_data_check_validates_medical_parts(ct, volume, tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": str(ct), "window": "lung"},
                                                   {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": str(ct), "window": "lungz"},
                                                   {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": str(volume[0]), "slices": 3},
                                                   {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": "a"}]},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = check_dataset([f], allow_outside_paths=True)
    assert report.n_samples == 3 and report.n_ok == 2
    [err] = report.errors
    assert err.kind == "bad_media_option" and err.line == 2 and "lungz" in str(err)


@pytest.mark.parametrize("family_name", ["qwen2_5_omni", "baichuan_omni"])
def test_medical_parts_flow_through_both_families(tmp_path, family_name):
    """A windowed CT slice and three NIfTI slices in one sample: four images reach the model,
    and the metadata token count equals the encoded length."""
    import torch

    from finetune.data.schema import parse_sample
    from finetune.families import family_for
    from finetune.recipe import load_recipe

    ct = np.full((64, 64), 424, dtype=np.int16)  # HU -600 after the intercept
    write_dicom(tmp_path / "ct.dcm", ct, bits_stored=16, RescaleSlope=1, RescaleIntercept=-1024)
    vol = np.arange(48 * 40 * 5, dtype=np.int16).reshape(48, 40, 5)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    s = parse_sample({"messages": [
        {"role": "user", "content": [{"type": "image", "path": "ct.dcm", "window": "lung"},
                                     {"type": "image", "path": "vol.nii.gz", "slices": 3},
                                     {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "No lesion."}]}, source="t.jsonl", line=1, base_dir=tmp_path)
    path = {"qwen2_5_omni": "tiny:qwen2_5_omni", "baichuan_omni": "tiny:baichuan_omni"}[family_name]
    recipe = load_recipe("medical-tiny", [f"model.path={path}"])
    fam = family_for(path)
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    e = fam.encode(s, loaded.processor)
    assert len(e.media["image_grid_thw"]) == 4
    assert fam.count_tokens(s, loaded.processor) == e.num_tokens
    # the CT's lung-windowed grey level (127-128 at the window centre) reaches the patches
    mean, std = loaded.processor.image_mean[0], loaded.processor.image_std[0]
    first = e.media["pixel_values"][: int(e.media["image_grid_thw"][0].prod())]
    level = float(first.view(-1, 3, 2, 14, 14)[:, 0].mean()) * std + mean
    assert abs(level * 255 - 127.5) < 1.5
    batch = fam.collate_padded([e], loaded.processor.pad_id)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).loss)


def _peak_bytes_per_pixel(fn, n_pixels: int) -> float:
    import tracemalloc

    tracemalloc.start()  # numpy reports its array allocations to tracemalloc
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / n_pixels
    finally:
        tracemalloc.stop()


def test_medical_pixel_math_runs_in_float32(tmp_path):
    """Rescale and window (DICOM), scl_slope/scl_inter and window (NIfTI) in float32: one float64 copy of
    the image alone would be 8 bytes a pixel, and the math needs two or three arrays at once."""
    import nibabel as nib

    n = 1024
    arr = (np.arange(n * n, dtype=np.int32) % 3000).astype(np.int16).reshape(n, n)
    dcm = write_dicom(tmp_path / "ct.dcm", arr, bits_stored=16, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=40, WindowWidth=400)
    img = nib.Nifti1Image(arr[:, :, None], np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nii = tmp_path / "ct.nii.gz"
    nib.save(img, str(nii))
    for path, opts in ((dcm, {}), (dcm, {"window": "minmax"}), (nii, {"window": "lung"}), (nii, {})):
        read_medical_images(path, opts)  # imports and caches first
        per_pixel = _peak_bytes_per_pixel(lambda: read_medical_images(path, opts), n * n)
        assert per_pixel < 18, f"{path.name} {opts}: {per_pixel:.1f} bytes a pixel at the peak"
    # the same image as before the change to float32: the window maps HU exactly as documented
    a = gray(read_medical_images(dcm, {"window": [40, 400]})[0])
    expected = np.rint(np.clip((arr.astype(np.float64) - 1024 + 160) / 400 * 255, 0, 255))
    assert np.abs(a - expected).max() <= 1 and (a != expected).mean() < 1e-3  # a float32 tie may round apart


def _bytes_read() -> int:
    with open("/proc/self/io") as f:  # rchar: bytes this process read through read() calls
        return int(next(x for x in f if x.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads through Linux's /proc/self/io")
@pytest.mark.parametrize("axis", [2, 0])
def test_many_slices_of_a_gzipped_volume_are_read_in_one_pass(tmp_path, axis):
    """`"slices": n` on a .nii.gz reads the file once, not once per slice (a gzip stream cannot seek back:
    each slice read anew decompressed everything before it, 0.7 s a slice on 512 x 512 x 300, hours on a
    volume at data.max_volume_voxels), and gives the slices read one at a time."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 2000, (96, 64, 48), dtype=np.int16)
    img = nib.Nifti1Image(vol, np.eye(4))
    img.header.set_slope_inter(0.5, -100.0)
    path = tmp_path / "vol.nii.gz"
    nib.save(img, str(path))
    read_medical_images(path, {"axis": axis})  # imports first
    before = _bytes_read()
    many = read_medical_images(path, {"axis": axis, "slices": 20, "window": [0, 800]})
    passes = (_bytes_read() - before) / path.stat().st_size
    assert len(many) == 20
    assert passes < 2.5, f"the file was read {passes:.1f} times over for 20 slices"
    n = vol.shape[axis]
    for i in (0, 7, 19):
        k = min(int((i + 0.5) * n / 20), n - 1)
        one = read_medical_images(path, {"axis": axis, "slice": k, "window": [0, 800]})[0]
        assert np.array_equal(np.asarray(many[i]), np.asarray(one))
        expected = np.take(vol, k, axis=axis).astype(np.float64) * 0.5 - 100.0
        assert np.abs(gray(one) - np.rint(np.clip((expected + 400) / 800 * 255, 0, 255))).max() <= 1


def test_an_eps_file_is_not_opened_as_an_image(tmp_path):
    """Pillow's EPS plugin runs Ghostscript (when installed) on the file: only raster formats with
    their own decoders are opened. An EPS named like a PNG is refused as an unreadable image."""
    from finetune.data.media import MediaError, load_image

    eps = tmp_path / "scan.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    with pytest.raises(MediaError, match="cannot identify image file"):
        load_image(eps)


def _lut_item(descriptor, data, vr="US"):
    """A Modality/VOI LUT Sequence item; LUTData as US values or OW bytes (real files have both)."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", list(descriptor))
    item.add_new("LUTData", vr, [int(x) for x in data] if vr == "US" else np.asarray(data, "<u2").tobytes())
    return item


# stored values below, inside and above the input ranges of the LUTs below (100 .. 355, 100 .. 611)
LUT_STORED = np.array([[0, 99, 100, 101], [200, 355, 356, 4095]], dtype=np.uint16)


def test_a_modality_lut_sequence_maps_the_stored_values_as_pydicom_defines(tmp_path):
    """A Modality LUT Sequence (in place of RescaleSlope/RescaleIntercept) maps the stored values before
    any window: pydicom's apply_modality_lut, the window then in the LUT's output units."""
    from pydicom.pixels import apply_modality_lut

    lut = [(i * 37) % 4000 for i in range(256)]
    p = write_dicom(tmp_path / "mlut.dcm", LUT_STORED, ModalityLUTSequence=[_lut_item((256, 100, 16), lut)])
    ds = pydicom.dcmread(p)
    mapped = apply_modality_lut(ds.pixel_array, ds)
    assert mapped.tolist() != LUT_STORED.tolist()
    windowed = gray(read_medical_images(p, {"window": [2000, 4000]})[0])
    assert windowed.tolist() == [[lin(v, 2000, 4000) for v in row] for row in mapped]
    lo, hi = int(mapped.min()), int(mapped.max())  # no window in the file: the mapped values' min-max
    assert gray(read_medical_images(p, {})[0]).tolist() == [[lin(v, (lo + hi) / 2, hi - lo) for v in row]
                                                            for row in mapped]


def test_a_voi_lut_sequence_maps_the_rescaled_values_as_pydicom_defines(tmp_path):
    """A VOI LUT Sequence maps the rescaled values to its output range (0 .. 2**bits - 1, shown as
    0 .. 255): pydicom's apply_voi_lut, which prefers it to the file's WindowCenter/WindowWidth.
    MONOCHROME1 is inverted after it; a window given on the part still wins over the file's."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    lut = [min(4095, i * 8) for i in range(512)]
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        p = write_dicom(tmp_path / f"voi-{photometric}.dcm", LUT_STORED, photometric=photometric,
                        RescaleSlope=1, RescaleIntercept=100, WindowCenter=40, WindowWidth=400,
                        VOILUTSequence=[_lut_item((512, 100, 12), lut, vr="OW")])
        ds = pydicom.dcmread(p)
        shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.int32), ds)
        expected = np.rint(shown * 255.0 / 4095).astype(int)
        if photometric == "MONOCHROME1":
            expected = 255 - expected
        assert gray(read_medical_images(p, {})[0]).tolist() == expected.tolist(), photometric
    rescaled = LUT_STORED.astype(float) + 100
    assert gray(read_medical_images(p, {"window": [300, 600]})[0]).tolist() == [
        [255 - lin(v, 300, 600) for v in row] for row in rescaled]


def test_a_lut_pydicom_cannot_apply_is_a_clear_error(tmp_path):
    lut = [0] * 16
    p = write_dicom(tmp_path / "bad-voi.dcm", LUT_STORED, VOILUTSequence=[_lut_item((16, 0, 9), lut)])
    with pytest.raises(MediaError, match=r"VOI LUT.*bad-voi\.dcm|bad-voi\.dcm.*VOI LUT"):
        read_medical_images(p, {})
    assert read_medical_images(p, {"window": "minmax"})[0].size == (4, 2)  # a window on the part needs no LUT


def test_lut_sequences_are_applied_in_bounded_memory(tmp_path):
    """The LUTs are integer lookups, no float64 copy of the image (see the float32 test above), and the
    temporaries of pydicom's LUT functions stay the size of a band of rows, not of the image."""
    n = 2048
    arr = (np.arange(n * n, dtype=np.int32) % 4096).astype(np.uint16).reshape(n, n)
    lut = np.arange(4096) // 2
    mlut = write_dicom(tmp_path / "m.dcm", arr, ModalityLUTSequence=[_lut_item((4096, 0, 16), lut)])
    voi = write_dicom(tmp_path / "v.dcm", arr, RescaleSlope=1, RescaleIntercept=0,
                      VOILUTSequence=[_lut_item((4096, 0, 12), lut, vr="OW")])
    for path in (mlut, voi):
        read_medical_images(path, {})
        per_pixel = _peak_bytes_per_pixel(lambda: read_medical_images(path, {}), n * n)
        assert per_pixel < 18, f"{path.name}: {per_pixel:.1f} bytes a pixel at the peak"


def _dicoms_without_luts(folder: Path) -> list[tuple[str, Path, dict]]:
    """The DICOM files of this module's tests (rescale and window tags, no LUT sequence), and a noisier
    one with a fractional rescale, each with the options the tests read them with."""
    ct = write_dicom(folder / "ct.dcm", CT_STORED, RescaleSlope=1, RescaleIntercept=-1024,
                     WindowCenter=[40, 400], WindowWidth=[400, 1500])
    signed = write_dicom(folder / "s.dcm", np.array([[-1000, 0], [500, 1000]], dtype=np.int16),
                         RescaleSlope=2, RescaleIntercept=-10)
    m1 = write_dicom(folder / "m1.dcm", CT_STORED, photometric="MONOCHROME1", RescaleSlope=1,
                     RescaleIntercept=-1024)
    frames = np.stack([np.full((4, 5), 100 * (k + 1), dtype=np.uint16) for k in range(5)])
    frames[:, 0, 0] = 0
    mf = write_dicom(folder / "mf.dcm", frames)
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 0], rgb[1, 2] = 200, (10, 20, 30)
    rgb = write_dicom(folder / "rgb.dcm", rgb, photometric="RGB", bits_stored=8)
    noise = np.random.default_rng(0).integers(-2000, 3000, (64, 48), dtype=np.int16)
    noisy = write_dicom(folder / "noise.dcm", noise, bits_stored=16, RescaleSlope=0.37,
                        RescaleIntercept=-1024.3, WindowCenter=40.5, WindowWidth=401)
    return [("ct", ct, {}), ("ct-lung", ct, {"window": "lung"}), ("ct-minmax", ct, {"window": "minmax"}),
            ("ct-centre", ct, {"window_center": 0, "window_width": 2000}), ("signed", signed, {}),
            ("signed-window", signed, {"window": [-10, 100]}), ("m1", m1, {"window": "lung"}), ("m1-minmax", m1, {}),
            ("mf", mf, {}), ("mf-0", mf, {"frame": 0, "window": [0, 1020]}), ("rgb", rgb, {"window": "lung"}),
            ("noise", noisy, {}), ("noise-minmax", noisy, {"window": "minmax"}),
            ("noise-bone", noisy, {"window": "bone"})]


# sha256 (first 16 hex digits) of mode, size and pixels of each image, recorded with the reader as it
# was before pydicom's LUT functions came in (commit 8cad6a6): files without a LUT sequence decode as then
WITHOUT_LUTS = {
    "ct": "4e228566129a9993",
    "ct-lung": "d6ea302cc2774617",
    "ct-minmax": "6cacb79906ec8a01",
    "ct-centre": "0c11f7fa898ba45d",
    "signed": "16cb91b9158cb67c",
    "signed-window": "0e4a3627f491bb7c",
    "m1": "fe0798545717b967",
    "m1-minmax": "d62aa14eef4afd12",
    "mf": "bb3e8b9c614f054b",
    "mf-0": "f9b5889f2b026ef2",
    "rgb": "0911e4fb014f9dcb",
    "noise": "f794d9dea75b8e00",
    "noise-minmax": "8d530e30fd639984",
    "noise-bone": "42a00d8ac999e1fc",
}


def test_dicoms_without_lut_sequences_decode_as_before(tmp_path):
    import hashlib

    got = {}
    for name, path, opts in _dicoms_without_luts(tmp_path):
        h = hashlib.sha256()
        for im in read_medical_images(path, opts):
            h.update(repr((im.mode, im.size)).encode())
            h.update(np.asarray(im).tobytes())
        got[name] = h.hexdigest()[:16]
    assert got == WITHOUT_LUTS
