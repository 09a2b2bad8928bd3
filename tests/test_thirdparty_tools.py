"""Tests for the pure helpers of tools/thirdparty.py (no network, no scikit-image, no wheels)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TOOLS, load_tool

THIRDPARTY_PY = TOOLS / "thirdparty.py"


tp = load_tool("thirdparty")


# ----------------------------------------------------------------- wheels

def _wheel(tmp_path: Path, name: str, members: dict[str, bytes]) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


def test_wheel_members_lists_only_onnx(tmp_path):
    whl = _wheel(tmp_path, "pkg-1.0-py3-none-any.whl", {
        "pkg/__init__.py": b"", "pkg/models/b.onnx": b"bb", "pkg/a.onnx": b"a",
        "pkg-1.0.dist-info/METADATA": b"x"})
    assert tp.wheel_members(whl) == ["pkg/a.onnx", "pkg/models/b.onnx"]
    assert tp.wheel_members(whl, ".py") == ["pkg/__init__.py"]


def test_extract_member_writes_bytes_and_reuses(tmp_path):
    whl = _wheel(tmp_path, "pkg-1.0-py3-none-any.whl", {"pkg/models/m.onnx": b"\x08\x07model"})
    dest = tmp_path / "out"
    p = tp.extract_member(whl, "pkg/models/m.onnx", dest)
    assert p == dest / "m.onnx" and p.read_bytes() == b"\x08\x07model"
    mtime = p.stat().st_mtime_ns
    assert tp.extract_member(whl, "pkg/models/m.onnx", dest) == p
    assert p.stat().st_mtime_ns == mtime  # same size: not rewritten
    assert not list(dest.glob("*.part"))


def test_extract_member_stays_inside_dest(tmp_path):
    whl = _wheel(tmp_path, "evil-1.0-py3-none-any.whl", {"../../escape.onnx": b"x"})
    dest = tmp_path / "a" / "b"
    p = tp.extract_member(whl, "../../escape.onnx", dest)
    assert p == dest / "escape.onnx"
    assert not (tmp_path / "escape.onnx").exists()


def test_extract_missing_member_names_what_exists(tmp_path):
    whl = _wheel(tmp_path, "pkg-1.0-py3-none-any.whl", {"pkg/real.onnx": b"x"})
    with pytest.raises(KeyError, match="pkg/real.onnx"):
        tp.extract_member(whl, "pkg/other.onnx", tmp_path)


@pytest.mark.parametrize("name, ok", [
    ("rapidocr_onnxruntime-1.4.4-py3-none-any.whl", True),
    ("rapidocr_onnxruntime-1.4.5-py3-none-any.whl", False),
    ("rapidocr-1.4.4-py3-none-any.whl", False),
    ("rapidocr_onnxruntime-1.4.4.tar.gz", False),
    ("Rapidocr_Onnxruntime-1.4.4-py3-none-any.whl", True),
])
def test_wheel_filename_matches(name, ok):
    assert tp.wheel_filename_matches(name, "rapidocr-onnxruntime", "1.4.4") is ok


def test_find_wheel(tmp_path):
    assert tp.find_wheel(tmp_path / "missing", "ddddocr", "1.6.1") is None
    (tmp_path / "ddddocr-1.6.0-py3-none-any.whl").write_bytes(b"")
    assert tp.find_wheel(tmp_path, "ddddocr", "1.6.1") is None
    (tmp_path / "ddddocr-1.6.1-py3-none-any.whl").write_bytes(b"")
    assert tp.find_wheel(tmp_path, "ddddocr", "1.6.1").name == "ddddocr-1.6.1-py3-none-any.whl"


def test_model_specs_are_consistent():
    for key, spec in tp.MODELS.items():
        assert spec.key == key and spec.member.endswith(".onnx")
        assert spec.task in ("textmap", "yolox", "ctc")
        assert spec.preprocessing
    assert not set(tp.PHOTOS_CALIB) & set(tp.PHOTOS_HELDOUT)


# ----------------------------------------------------------------- images

def test_to_rgb_uint8_all_kinds():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert tp.to_rgb_uint8(gray).shape == (3, 4, 3)
    np.testing.assert_array_equal(tp.to_rgb_uint8(gray)[..., 1], gray)
    assert tp.to_rgb_uint8(np.ones((2, 2), bool)).max() == 255
    np.testing.assert_array_equal(tp.to_rgb_uint8(np.full((2, 2), 0.5)), 128)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (0, 0, 0, 0)  # transparent -> white
    out = tp.to_rgb_uint8(rgba)
    np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
    with pytest.raises(ValueError):
        tp.to_rgb_uint8(np.zeros((2, 2, 2), np.uint8))


def test_split_halves_disjoint_and_complete():
    img = np.arange(5 * 7).reshape(5, 7)
    left, right = tp.split_halves(img)
    assert left.shape == (5, 3) and right.shape == (5, 4)
    np.testing.assert_array_equal(np.concatenate([left, right], 1), img)


def test_to_gray_matches_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    np.testing.assert_array_equal(tp.to_gray(rgb), [[76, 150, 29, 255]])


def _fake_page(lines=((10, 18), (30, 40), (55, 62)), h=70, w=120, seed=0):
    """Light page with a brightness gradient and dark 'letters' in the given row bands."""
    rng = np.random.default_rng(seed)
    page = (200 + 40 * np.linspace(0, 1, w)[None, :] * np.ones((h, 1))).astype(np.float64)
    for y0, y1 in lines:
        for x in range(5, w - 5, 6):  # letters: vertical strokes 3 px wide
            page[y0:y1, x:x + 3] = 40 + rng.uniform(0, 20)
    return page.astype(np.uint8)


def test_text_line_bands_finds_lines():
    bands = tp.text_line_bands(_fake_page())
    assert len(bands) == 3
    for (y0, y1), (e0, e1) in zip(bands, ((10, 18), (30, 40), (55, 62))):
        assert abs(y0 - e0) <= 1 and abs(y1 - e1) <= 1


def test_text_line_bands_blank_and_min_height():
    assert tp.text_line_bands(np.full((40, 50), 220, np.uint8)) == []
    assert tp.text_line_bands(_fake_page(lines=((10, 13),)), min_height=5) == []
    with pytest.raises(ValueError):
        tp.text_line_bands(np.zeros((3, 4, 3), np.uint8))


def test_random_window_inside_image_and_seeded():
    rng = np.random.default_rng(0)
    for _ in range(50):
        y0, x0, h, w = tp.random_window((30, 40), (10, 25), rng)
        assert (h, w) == (10, 25) and 0 <= y0 <= 20 and 0 <= x0 <= 15
    assert tp.random_window((5, 6), (10, 10), rng)[2:] == (5, 6)  # clipped
    a = tp.random_window((100, 100), (10, 10), np.random.default_rng(3))
    assert a == tp.random_window((100, 100), (10, 10), np.random.default_rng(3))


def test_line_window_around_band():
    y0, x0, h, w = tp.line_window((20, 30), 200, 4.0, np.random.default_rng(0), margin=0.5)
    assert (y0, h) == (15, 20) and w == 80 and 0 <= x0 <= 120
    assert tp.line_window((2, 12), 30, 10.0, np.random.default_rng(0))[3] == 30  # clipped width


def test_normalize_chw_bgr_order_and_range():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 0] = 255  # red
    x = tp.normalize_chw(rgb)
    assert x.shape == (3, 2, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[2], 1.0)  # red is the last channel in BGR
    np.testing.assert_allclose(x[0], -1.0)
    np.testing.assert_allclose(tp.normalize_chw(rgb, bgr=False)[0], 1.0)


def test_ppocr_det_input_shape_and_multiple_of_32():
    x = tp.ppocr_det_input(np.full((50, 70, 3), 255, np.uint8), (64, 96))
    assert x.shape == (3, 64, 96)
    np.testing.assert_allclose(x, 1.0)
    with pytest.raises(ValueError):
        tp.ppocr_det_input(np.zeros((10, 10, 3), np.uint8), (50, 64))


def test_ppocr_rec_input_pads_right_with_zeros():
    x = tp.ppocr_rec_input(np.full((24, 48, 3), 255, np.uint8), (48, 320))
    assert x.shape == (3, 48, 320)
    np.testing.assert_allclose(x[:, :, :96], 1.0)  # width 48·48/24 = 96
    np.testing.assert_array_equal(x[:, :, 96:], 0.0)
    wide = tp.ppocr_rec_input(np.zeros((10, 1000, 3), np.uint8), (48, 320))
    np.testing.assert_allclose(wide, -1.0)  # capped at 320, no padding


def test_ddddocr_ocr_input_gray_unit_range():
    rgb = np.zeros((16, 64, 3), np.uint8)
    rgb[:, 32:] = 255
    x = tp.ddddocr_ocr_input(rgb, (64, 256))
    assert x.shape == (1, 64, 256) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0


def test_letterbox_top_left_pad_114_bgr():
    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[..., 2] = 255  # blue
    x, r = tp.letterbox(rgb, (416, 416))
    assert r == pytest.approx(416 / 200) and x.shape == (3, 416, 416)
    assert x.dtype == np.float32
    assert x[0, 0, 0] == 255 and x[2, 0, 0] == 0  # BGR: blue first
    np.testing.assert_array_equal(x[:, 300:, :], 114)  # padding below the image (208 rows used)


# ----------------------------------------------------------------- metrics

def test_rel_l2():
    a = np.array([3.0, 4.0])
    assert tp.rel_l2(a, a) == 0.0
    assert tp.rel_l2(a, a * 1.1) == pytest.approx(0.1)
    assert tp.rel_l2(np.zeros(2), np.zeros(2)) == 0.0
    assert tp.rel_l2(np.zeros(2), np.ones(2)) == np.inf
    with pytest.raises(ValueError):
        tp.rel_l2(np.zeros(2), np.zeros(3))


def test_mask_iou_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert tp.mask_iou(a, b) == 1.0  # both empty
    a[:2] = True
    assert tp.mask_iou(a, b) == 0.0
    b[1:3] = True
    assert tp.mask_iou(a, b) == pytest.approx(4 / 12)
    assert tp.mask_iou(a, a) == 1.0
    with pytest.raises(ValueError):
        tp.mask_iou(a, np.zeros((3, 3), bool))


def test_pooled_mask_iou_weights_by_pixels():
    big_a = np.ones((10, 10), bool)
    big_b = np.ones((10, 10), bool)
    small_a = np.zeros((2, 2), bool)
    small_a[0, 0] = True
    small_b = np.zeros((2, 2), bool)
    small_b[1, 1] = True
    assert tp.pooled_mask_iou([(big_a, big_b), (small_a, small_b)]) == pytest.approx(100 / 102)
    assert tp.pooled_mask_iou([]) == 1.0


def test_box_iou_known_values():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    iou = tp.box_iou(a, b)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [1 / 7, 1.0, 0.0])
    np.testing.assert_allclose(iou[1], [0.0, 0.25, 0.0])
    assert tp.box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    assert tp.box_iou(np.array([[0, 0, 0, 0]]), np.array([[0, 0, 0, 0]]))[0, 0] == 0.0


def test_nms_suppresses_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert tp.nms(boxes, scores, 0.5) == [3, 2]
    assert sorted(tp.nms(boxes, scores, 1.0)) == [0, 1, 2, 3]
    assert tp.nms(np.zeros((0, 4)), np.zeros(0), 0.5) == []


def test_match_boxes_one_to_one():
    ref = np.array([[0, 0, 10, 10], [20, 0, 30, 10]])
    new = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    m, miou = tp.match_boxes(ref, new, 0.5)
    assert m == 1 and miou == pytest.approx(1.0)  # the shifted copy cannot reuse ref 0
    assert tp.match_boxes(ref, np.zeros((0, 4))) == (0, 0.0)
    assert tp.detection_f1(2, 3, 1) == pytest.approx(0.4)
    assert tp.detection_f1(0, 0, 0) == 1.0
    assert tp.detection_f1(3, 0, 0) == 0.0


def test_yolox_boxes_decodes_one_anchor():
    hw = (64, 64)  # strides 8, 16, 32 -> 64 + 16 + 4 anchors
    out = np.full((1, 84, 6), -10.0)
    out[..., 4] = 0.0  # objectness 0: nothing passes the score threshold
    # anchor 64 + 5 is stride 16, grid (x=1, y=1): center ((0.5+1)*16, (0.5+1)*16) = (24, 24)
    out[0, 69] = [0.5, 0.5, np.log(2.0), np.log(1.0), 0.9, 0.8]  # w = 2*16, h = 16
    boxes, scores = tp.yolox_boxes(out, hw)
    np.testing.assert_allclose(boxes, [[8, 16, 40, 32]])
    np.testing.assert_allclose(scores, [0.72])
    with pytest.raises(ValueError):
        tp.yolox_boxes(out[:, :80], hw)


def test_ctc_greedy():
    assert tp.ctc_greedy([0, 3, 3, 0, 3, 5, 5, 0]) == [3, 3, 5]
    assert tp.ctc_greedy([]) == []
    assert tp.ctc_greedy(np.array([[1, 1, 2]])) == [1, 2]
    assert tp.ctc_greedy([2, 2, 1], blank=2) == [1]


def test_ctc_frames_layouts():
    x = np.arange(2 * 1 * 3).reshape(2, 1, 3)
    np.testing.assert_array_equal(tp.ctc_frames(x, "TNC"), x[:, 0])
    y = np.arange(1 * 2 * 3).reshape(1, 2, 3)
    np.testing.assert_array_equal(tp.ctc_frames(y, "NTC"), y[0])
    with pytest.raises(ValueError):
        tp.ctc_frames(x[0], "NTC")


def test_fidelity_identical_outputs_are_perfect():
    rng = np.random.default_rng(0)
    det = [rng.uniform(size=(1, 1, 32, 32)).astype(np.float32) for _ in range(3)]
    name, value, _, _ = tp.fidelity(tp.MODELS["ppocr-det"], det, det)
    assert "IoU" in name and value == 1.0
    rec = [rng.normal(size=(1, 40, 10)) for _ in range(3)]
    name, value, extra, _ = tp.fidelity(tp.MODELS["ppocr-rec"], rec, rec, ["blank"] + list("abcdefghi"))
    assert value == 1.0 and "100.0 %" in extra
    dd = [rng.normal(size=(16, 1, 10)) for _ in range(2)]
    assert tp.fidelity(tp.MODELS["ddddocr-ocr"], dd, [d + 0 for d in dd])[1] == 1.0


def test_fidelity_detects_changed_strings():
    a = np.zeros((4, 1, 3))
    a[[0, 2], 0, 1] = 1.0  # frames: 1 0 1 0 -> "1 1"
    b = a.copy()
    b[2, 0, 2] = 2.0  # frame 2 -> class 2
    _, value, extra, _ = tp.fidelity(tp.MODELS["ddddocr-ocr"], [a, a], [a, b])
    assert value == 0.5 and "87.5 %" in extra


# ----------------------------------------------------------------- table

def test_markdown_table():
    text = tp.markdown_table(["a", "b"], [[1, "x|y"], ["2", 3.5]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| 2 | 3.5 |"]
    with pytest.raises(ValueError):
        tp.markdown_table(["a"], [[1, 2]])


def test_tool_does_not_import_torch_or_skimage_at_module_level():
    source = THIRDPARTY_PY.read_text()
    assert "import torch" not in source
    top = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("skimage" in line or "onnx_dwdecomp" in line for line in top)
