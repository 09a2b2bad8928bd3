"""Tests for the pure helpers of tools/thirdparty.py and its stage modules thirdparty_models.py,
thirdparty_inputs.py and thirdparty_eval.py (no network, no scikit-image, no wheels); the names
are reached through thirdparty.py's re-exports, as ``--eval tools/thirdparty.py:...`` does."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TOOLS, load_tool

THIRDPARTY_PY = TOOLS / "thirdparty.py"
#: thirdparty.py and the modules it is split into.
THIRDPARTY_FILES = [THIRDPARTY_PY] + [TOOLS / f"thirdparty_{part}.py" for part in ("models", "inputs", "eval")]


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


# ----------------------------------------------------------------- splits

def test_photo_splits_pairwise_disjoint():
    assert set(tp.PHOTOS) == set(tp.SPLITS) == set(tp.TEXT_COLUMNS) == set(tp.SPLITS_SEED)
    names = [n for split in tp.SPLITS for n in tp.PHOTOS[split]]
    assert len(names) == len(set(names))
    assert not {"cat", "chelsea"} <= set(names)  # the same photo under two names
    assert not set(names) & set(tp.TEXT_IMAGES)
    assert len(set(tp.SPLITS_SEED.values())) == len(tp.SPLITS)


@pytest.mark.parametrize("width", [7, 8, 191, 384, 448])
def test_text_image_splits_disjoint_and_cover(width):
    img = np.arange(5 * width).reshape(5, width)  # every pixel a distinct value
    parts = tp.split_text_image(img)
    assert set(parts) == set(tp.SPLITS)
    seen = [set(part.ravel().tolist()) for part in parts.values()]
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not seen[i] & seen[j]
    assert set().union(*seen) == set(img.ravel().tolist())
    assert all(part.shape[0] == 5 and part.shape[1] >= 1 for part in parts.values())


def test_text_image_splits_keep_calibration_left_half():
    img = np.arange(3 * 384).reshape(3, 384)
    parts = tp.split_text_image(img)
    np.testing.assert_array_equal(parts["calib"], tp.split_halves(img)[0])  # as before the validation split
    np.testing.assert_array_equal(np.concatenate([parts["validation"], parts["heldout"]], 1),
                                  tp.split_halves(img)[1])
    assert tp.column_ranges(384) == {"calib": (0, 192), "validation": (192, 288), "heldout": (288, 384)}


def test_column_ranges_refuse_overlap_and_bad_fractions():
    with pytest.raises(ValueError, match="overlapping"):
        tp.column_ranges(100, {"a": (0.0, 0.6), "b": (0.5, 1.0)})
    with pytest.raises(ValueError):
        tp.column_ranges(100, {"a": (0.5, 0.5)})


def _fake_sources():
    """Sources like load_sources() (text images split by columns) without scikit-image."""
    rng = np.random.default_rng(1)
    page = np.repeat(_fake_page(h=120, w=480)[:, :, None], 3, axis=2)
    scene = rng.integers(0, 255, size=(150, 200, 3), dtype=np.uint8)
    out = {split: {"text": [], "photo": [(f"photo-{split}", scene)]} for split in tp.SPLITS}
    for split, part in tp.split_text_image(page).items():
        out[split]["text"].append((f"page[{split}]", part))
    return out


@pytest.mark.parametrize("key", list(tp.MODELS))
def test_build_inputs_every_split(key):
    spec = tp.MODELS[key]
    sources = _fake_sources()
    got = {split: tp.build_inputs(spec, sources, split, 3, seed=0) for split in tp.SPLITS}
    for split, (x, names) in got.items():
        assert x.shape[0] == 3 and x.shape[-2:] == spec.input_hw and x.dtype == np.float32
        assert all(n.split("@")[0] in (f"page[{split}]", f"photo-{split}") for n in names)
    again, _ = tp.build_inputs(spec, sources, "validation", 3, seed=0)
    np.testing.assert_array_equal(again, got["validation"][0])
    with pytest.raises(ValueError, match="unknown split"):
        tp.build_inputs(spec, sources, "test", 3, seed=0)


# ----------------------------------------------------------------- task-aware evaluate

class FakeRunner:
    """runner(model_path, inputs): outputs looked up by path; counts calls per path."""

    def __init__(self, outputs: dict[str, list[np.ndarray]]):
        self.outputs = outputs
        self.calls: list[str] = []

    def __call__(self, model_path, inputs):
        self.calls.append(model_path)
        return [o.copy() for o in self.outputs[model_path]]


def _textmaps(rng, n=4):
    return [rng.uniform(0, 0.6, size=(1, 1, 32, 32)).astype(np.float32) for _ in range(n)]


def _ctc_outputs(layout, rng, n=4, t=12, k=6):
    outs = []
    for _ in range(n):
        ids = rng.integers(0, k, size=t)
        one_hot = np.eye(k)[ids] + 0.01 * rng.standard_normal((t, k))
        outs.append(one_hot[None] if layout == "NTC" else one_hot[:, None])
    return outs


def _yolox_outputs(hw=(64, 64), n=3):
    """One confident box per image at distinct anchors (see test_yolox_boxes_decodes_one_anchor)."""
    outs = []
    for i in range(n):
        out = np.full((1, 84, 6), -10.0)
        out[..., 4] = 0.0
        out[0, 64 + i] = [0.5, 0.5, np.log(2.0), np.log(1.0), 0.9, 0.8]
        outs.append(out)
    return outs


def _perturb(key, outs):
    bad = [o.copy() for o in outs]
    if key == "ppocr-det":
        bad[0][0, 0, :16] = 0.0  # half of one text map goes below the 0.3 threshold
        bad[1][0, 0, :16] = 0.9  # ... and half of another above it
    elif key == "ddddocr-det":
        bad[0][0, 64, 4] = 0.0  # one box's objectness gone
    else:
        frames = tp.ctc_frames(bad[0], "NTC" if key == "ppocr-rec" else "TNC")
        frames[:] = 0.0
        frames[:, 1] = 1.0  # every frame now says class 1: a different string
    return bad


@pytest.mark.parametrize("key", list(tp.MODELS))
def test_task_evaluator_scores_original_one_and_perturbed_lower(key):
    spec = tp.MODELS[key]
    rng = np.random.default_rng(0)
    if spec.task == "textmap":
        ref = _textmaps(rng)
    elif spec.task == "ctc":
        ref = _ctc_outputs("NTC" if key == "ppocr-rec" else "TNC", rng)
    else:
        ref = _yolox_outputs()
        spec = dataclasses.replace(spec, input_hw=(64, 64))
    runner = FakeRunner({"orig.onnx": ref, "same.onnx": [r.copy() for r in ref],
                         "bad.onnx": _perturb(key, ref)})
    inputs = np.zeros((len(ref), 1, 2, 2), np.float32)
    fn = tp.make_evaluate(spec, "orig.onnx", inputs, runner=runner)
    assert runner.calls == ["orig.onnx"]  # the original's outputs: computed once, at build time
    assert fn("orig.onnx") == 1.0
    assert fn("same.onnx") == 1.0
    bad = fn("bad.onnx")
    assert 0.0 <= bad < 1.0
    assert isinstance(bad, float)
    assert runner.calls.count("orig.onnx") == 2  # once cached + once scored as a candidate
    assert [c.model for c in fn.calls] == ["orig.onnx", "same.onnx", "bad.onnx"]
    assert [c.score for c in fn.calls] == [1.0, 1.0, bad]
    assert all(c.seconds >= 0 for c in fn.calls)


def test_task_evaluator_accepts_path_objects_and_checks_counts(tmp_path):
    spec = tp.MODELS["ppocr-det"]
    ref = _textmaps(np.random.default_rng(2), n=2)
    runner = FakeRunner({str(tmp_path / "m.onnx"): ref, "short.onnx": ref[:1]})
    fn = tp.make_evaluate(spec, tmp_path / "m.onnx", np.zeros((2, 3, 4, 4), np.float32), runner=runner)
    assert fn(tmp_path / "m.onnx") == 1.0
    with pytest.raises(ValueError, match="validation inputs"):
        fn("short.onnx")
    with pytest.raises(ValueError, match="outputs for"):
        tp.make_evaluate(spec, "short.onnx", np.zeros((2, 3, 4, 4), np.float32), runner=runner)


@pytest.mark.parametrize("text, value", [("3%", "3%"), ("0.5%", "0.5%"), ("0.02", 0.02), (" 1 ", 1.0),
                                         ("0", 0.0), ("2.50%", "2.5%")])
def test_parse_max_drop(text, value):
    assert tp.parse_max_drop(text) == value
    assert type(tp.parse_max_drop(text)) is type(value)


@pytest.mark.parametrize("text", ["", "abc", "-1", "-2%", "nan", "inf", "100%", "3%%"])
def test_parse_max_drop_refuses(text):
    with pytest.raises(ValueError, match="max-drop"):
        tp.parse_max_drop(text)


def test_max_drop_flag_and_task_aware_default():
    args = tp.build_parser().parse_args(["--max-drop", "3%"])
    assert args.max_drop == "3%"
    assert tp.build_parser().parse_args(["--max-drop", "0.01"]).max_drop == 0.01
    args = tp.build_parser().parse_args(["--task-aware"])
    assert args.task_aware and args.max_drop is None and args.validation_size is None
    assert tp.validation_size(tp.MODELS["ppocr-rec"]) == 64 and tp.validation_size(tp.MODELS["ppocr-det"]) == 32
    assert tp.validation_size(tp.MODELS["ppocr-det"], 8) == 8
    # one changed string out of the default validation set is a drop below 3 %
    assert all(1 / tp.validation_size(s) < 0.03 for s in tp.MODELS.values() if s.task == "ctc")
    specs = [tp.MODELS["ppocr-det"], tp.MODELS["ppocr-rec"]]
    assert tp.validation_text(specs, None) == "(ppocr-det 32, ppocr-rec 64)"
    assert tp.validation_text(specs, 10) == "10"
    with pytest.raises(SystemExit):
        tp.build_parser().parse_args(["--max-drop", "x"])


def test_score_floor():
    assert tp.score_floor("3%") == pytest.approx(0.97)
    assert tp.score_floor("3%", base=0.5) == pytest.approx(0.485)
    assert tp.score_floor(0.02) == pytest.approx(0.98)


def test_package_evaluations_reads_whichever_key():
    assert tp.package_evaluations({}) == []
    assert tp.package_evaluations({"budget": None}) == []
    assert tp.package_evaluations({"budget": {"mode": "max_error"}}) == []
    ev = [{"score": 1.0}, {"score": 0.97}]
    assert tp.package_evaluations({"budget": {"evaluations": ev}}) == ev
    assert tp.package_evaluations({"budget": {"evaluate": {"trials": ev}}}) == ev
    assert tp.package_evaluations({"evaluations": ev}) == ev
    assert [tp._score_of(e) for e in ev + [0.5, {"x": 1}, "s"]] == [1.0, 0.97, 0.5, None, None]


def test_describe_evaluation():
    item = {"model": "candidate 3/7", "round": 1, "convs_rewritten": 2, "score": 0.98125,
            "within": True, "measured_output_rel_l2": 0.0412}
    assert tp._describe_evaluation(item) == "candidate 3/7 (2 convs, output error 0.0412): 0.981 within"
    assert tp._describe_evaluation({"model": "input", "score": 1.0}) == "input: 1.000"
    assert tp._describe_evaluation({}) == "?: -"
    assert tp._describe_evaluation(0.5) == "0.5"


def test_format_evaluations():
    assert tp.format_evaluations([1.0, 0.9812, 0.96], 0.9812) == "3: 1.000, 0.981, 0.960 → 0.981"
    assert tp.format_evaluations([], None) == "0: none"
    assert tp.format_evaluations([1.0], 1.0, package_count=2).endswith("(package counted 2)")


def test_render_task_rows_show_evaluations():
    args = tp.build_parser().parse_args(["--max-drop", "3%"])
    common = dict(model="ppocr-det", method="gsvd", convs_rewritten=2, convs_regular=6, macs_before=100,
                  macs_after=80, latency_before_ms=10.0, latency_after_ms=8.0, metric_name="text-map IoU",
                  metric=0.96, extra="", out_rel_l2=0.1, seconds=1.0, heldout=16)
    rows = [tp.Row(multiplier="plan", **common),
            tp.Row(multiplier="task", max_drop="3%", eval_scores=[1.0, 0.975], package_evals=2,
                   validation_score=0.975, within=False, **common)]
    text = tp.render(rows, [tp.MODELS["ppocr-det"]], args)
    lines = [line for line in text.splitlines() if line.startswith("| ppocr-det | gsvd")]
    assert len(lines) == 2
    assert "evaluations: validation scores" in text
    assert "| plan |" in lines[0] and "| - |" in lines[0]
    assert "task, drop ≤ 3%" in lines[1] and "2: 1.000, 0.975 → 0.975" in lines[1]
    assert "0.960 (OUTSIDE)" in lines[1]


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


@pytest.mark.parametrize("path", THIRDPARTY_FILES, ids=lambda p: p.name)
def test_tool_does_not_import_torch_or_skimage_at_module_level(path):
    source = path.read_text()
    assert "import torch" not in source
    top = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("skimage" in line or "onnx_dwdecomp" in line for line in top)


def test_split_modules_reexported_and_eval_entry_points_importable():
    """thirdparty.py re-exports the stage modules' names (the same objects), and the ``--eval``
    functions load through the package's own loader from either file, without running them."""
    import thirdparty_eval
    import thirdparty_inputs
    import thirdparty_models

    from onnx_dwdecomp.errors import OptionError
    from onnx_dwdecomp.usercode import load_callable

    for module in (thirdparty_models, thirdparty_inputs, thirdparty_eval):
        public = [n for n, v in vars(module).items() if not n.startswith("_")
                  and getattr(v, "__module__", None) == module.__name__]
        assert public and all(getattr(tp, n) is getattr(module, n) for n in public), module.__name__
    for name in ("eval_ppocr_det", "eval_ppocr_rec", "eval_ddddocr_ocr", "eval_ddddocr_det"):
        for file in ("thirdparty.py", "thirdparty_eval.py"):
            fn = load_callable(f"{TOOLS / file}:{name}", "evaluate function", OptionError)
            assert callable(fn) and fn.__name__ == name


def test_task_row_wires_evaluate_and_max_drop_into_decompose(tmp_path, monkeypatch):
    """The task-aware row hands the evaluate function and max_drop to decompose, records every
    call, reads the package's evaluations with .get and scores the held-out inputs (fake package)."""
    import dataclasses
    import types

    import onnx
    import onnx_dwdecomp

    from conftest import conv_model

    rng = np.random.default_rng(0)
    model = conv_model(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), hw=(8, 8), pads=[1, 1, 1, 1])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    spec = tp.ModelSpec("tiny", "pkg", "1", "m.onnx", "textmap", "x", (8, 8), "none")
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    seen = {}

    @dataclasses.dataclass
    class FakeOptions:
        method: str = "gsvd"
        evaluate: object = None
        max_drop: object = None
        select: str = "latency"

    def fake_decompose(source, progress=None, **opts):
        seen.update(opts)
        fn = opts["evaluate"]
        scores = [fn(str(src))]
        worse = onnx.ModelProto()
        worse.CopyFrom(source)
        w = onnx.numpy_helper.to_array(worse.graph.initializer[0]) * -1.0
        worse.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
        onnx.save(worse, str(tmp_path / "cand.onnx"))
        scores.append(fn(str(tmp_path / "cand.onnx")))
        macs = types.SimpleNamespace(macs_before=100, macs_after=100)
        report = types.SimpleNamespace(
            layers=(), skipped=(), model=macs, verification=None, notes=("task-aware: kept the input",),
            to_dict=lambda: {"budget": {"evaluations": [{"score": s} for s in scores]}})
        return source, report

    monkeypatch.setattr(onnx_dwdecomp, "DecomposeOptions", FakeOptions)
    monkeypatch.setattr(onnx_dwdecomp, "decompose", fake_decompose)
    fn = tp.make_evaluate(spec, src, x, threads=1)
    row = tp.evaluate(spec, src, x, x, method="gsvd", multiplier="task", out_dir=tmp_path / "out", threads=1,
                      runs=2, seed=0, exclude=(), log=lambda m: None, task_eval=fn, max_drop="3%")
    assert seen["evaluate"] is fn and seen["max_drop"] == "3%" and seen["multiplier"] is None
    assert "max_error" not in seen
    assert row.eval_scores[0] == 1.0 and row.eval_scores[1] < 1.0 and len(row.eval_scores) == 2
    assert row.package_evals == 2 and row.validation_score == 1.0
    assert row.metric == 1.0 and row.within is True and row.max_drop == "3%"
    assert (tmp_path / "out" / "tiny.gsvd.rtask.onnx").is_file()

    @dataclasses.dataclass
    class OldOptions:
        method: str = "gsvd"

    monkeypatch.setattr(onnx_dwdecomp, "DecomposeOptions", OldOptions)
    with pytest.raises(RuntimeError, match="no evaluate, max_drop option"):
        tp.evaluate(spec, src, x, x, method="gsvd", multiplier="task", out_dir=tmp_path / "out", threads=1,
                    runs=2, seed=0, exclude=(), log=lambda m: None, task_eval=fn, max_drop="3%")


def test_letterboxed_scene_crops_keep_the_whole_image_scale():
    """Free-aspect (letterboxed) crops of a narrow split take their size from the whole text
    image, clipped to the split's columns; square crops stay inside the split's short side."""
    part = np.zeros((200, 50, 3), np.uint8)  # a 50-column quarter of a 200-row text image
    photo = np.zeros((40, 40, 3), np.uint8)
    sources = {"text": [("page[validation]", part)], "photo": [("p", photo)],
               "side": {"page[validation]": 200}}
    free = tp._scene_crops(sources, 20, np.random.default_rng(0), square=False)
    texts = [c for name, c in free if name.startswith("page")]
    assert all(c.shape[0] >= 100 and c.shape[1] <= 50 for c in texts)
    assert all(max(c.shape[:2]) <= 40 for name, c in free if name.startswith("p@"))
    square = tp._scene_crops(sources, 20, np.random.default_rng(0), square=True)
    assert all(c.shape[0] == c.shape[1] <= 50 for name, c in square if name.startswith("page"))
