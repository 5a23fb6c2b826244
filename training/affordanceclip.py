"""AffordanceCLIP (affordanceclip.txt): a frozen CLIP plus a light FPN that turns CLIP's global
image embedding into per-pixel embeddings aligned with CLIP text, trained on object-level
referring masks only (training.referring_data) and queried zero-shot with affordance prompts.

    image -> frozen CLIP ViT --(CLS -> visual projection)------------> F_S (B, D)    §3.1
                         \\--(token grids of K depths, CLS dropped)--> F_1..F_K        §3.1
    F'_S = Linear+LN+ReLU(F_S); F'_k = Conv3x3+BN+ReLU(F_k) into C'               §3.2 eq. 1-2
    coarsest-first fusion: O = F'_coarsest + Up(F'_S); O = F'_k + Up(O)           §3.2 eq. 3-4
    F^O = Conv1x1(O) -> (B, D, h', w'), L2-normalised per pixel                     §3.2 eq. 5
    text -> frozen CLIP text tower + projection -> F_Q (B, D), L2-normalised        §3.1
    logits = exp(s) * <F^O, F_Q> + b, upsampled bilinearly to the input size       §3.3 eq. 6
    loss: per-pixel binary cross-entropy against the referring mask                  §3.4 eq. 7-8

Stated deviations from the paper:
- Backbone: the paper's CLIP is ResNet-101 with feature maps at 1/8, 1/16 and 1/32.
  transformers' `CLIPModel` is ViT-only, whose blocks all keep one token grid (1/patch). So the
  FPN reads the token grids after K evenly spaced blocks (the last included), deepest first,
  and rescales them into a pyramid as ViTDet's simple feature pyramid does: the deepest grid
  pooled x2 down, the middle one kept, the shallowest upsampled x2 (strides 2p, p, p/2 for
  K = 3, the paper's 1/32, 1/16, 1/8 at p = 16). Output F^O is at the finest level.
- The paper's eq. 3-5 number the levels so that F_1 is fused first, while its text says the
  global vector is fused with the *lowest*-resolution map first and the higher-resolution maps
  follow; we follow the text (coarse to fine), which is what an FPN's top-down path does.
- F_S is a vector: eq. 1's Conv3x3+BN on a 1x1 map reduces to a linear map, and BatchNorm over
  a batch of single vectors is degenerate at batch 1, so F'_S uses Linear + LayerNorm + ReLU.
- Eq. 5's Conv1x1 has no BN/ReLU here: the output is L2-normalised and compared by cosine with
  a signed CLIP text embedding, which a ReLU'd (non-negative) embedding could not align with.
- Eq. 6 is a plain dot product; we use cosine times a learnable scale (CLIP's logit scale)
  plus a learnable bias. The pixel embeddings do not depend on the text, so the background
  of one query is the target of another: background pixels can at best be orthogonal to a
  query (cosine 0, sigmoid 0.5 without a bias); the bias moves the sigmoid's threshold.

The `build_tiny_clip` model is NOT pretrained: random weights from a tiny config, so tests and
the demo run the real code path; its heat maps mean nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from operators.models.registry import TINY_TEXT_MAX_TOKENS
from operators.settings import ConfigError
from training.referring_data import referring_vocabulary

if TYPE_CHECKING:
    from transformers import CLIPModel

Tokenize = Callable[[Sequence[str]], tuple[Tensor, Tensor]]

# OpenAI CLIP's image normalisation (every released CLIP checkpoint uses it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIP caps its learned temperature at 100 (logit scale log 100) so training cannot blow it up.
MAX_LOGIT_SCALE = 100.0


# ---------------------------------------------------------------------------------------------
# CLIP loading
# ---------------------------------------------------------------------------------------------


def build_tiny_clip(seed: int = 0, *, image_size: int = 224, patch_size: int = 16) -> tuple[CLIPModel, Tokenize]:
    """A tiny transformers `CLIPModel` with random weights drawn from `seed`, and its tokenizer.

    NOT pretrained: its image-text similarities carry no meaning. It exists so tests and the
    offline demo exercise AffordanceCLIP's real code path. Vision: 4 blocks of width 64, 2
    heads, MLP 128, `image_size` / `patch_size` (224 / 16 by default). Text: 2 blocks of width
    64 over the word-level tokenizer of `operators.models.backbones.build_tiny_tokenizer`,
    extended with the referring vocabulary (colours, positions) that it lacks, so that
    training.referring_data's sentences do not turn into <unk>. Projection dim 64.
    The same seed gives the same weights; the caller's torch RNG state is left untouched.
    """
    from tokenizers import AddedToken
    from transformers import CLIPConfig, CLIPModel

    from operators.models.backbones import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    missing = [w for w in referring_vocabulary() if tokenizer.token_to_id(w) is None]
    # single_word: "red" must not match inside "shredded"; normalized: match after lower-casing
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in missing])
    ids = {t: tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")}
    config = CLIPConfig(
        text_config={"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": TINY_TEXT_MAX_TOKENS, "pad_token_id": ids["<pad>"],
                     "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"]},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size},
        projection_dim=64)
    # A private RNG state: the weights depend on the seed only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()

    def tokenize(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        encodings = tokenizer.encode_batch(list(texts))
        return (torch.tensor([e.ids for e in encodings], dtype=torch.long),
                torch.tensor([e.attention_mask for e in encodings], dtype=torch.long))

    return model, tokenize


def load_clip(model_path: str) -> tuple[CLIPModel, Tokenize]:
    """A pretrained CLIP (e.g. openai/clip-vit-base-patch16) and its tokenizer from a local
    `save_pretrained` directory; nothing is downloaded. Raises ConfigError naming the path."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"no CLIP model at {str(path.absolute())!r}: expected a save_pretrained "
                          "directory with config.json, weights and tokenizer files")
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot load CLIP from {str(path.absolute())!r}: {first}") from err
    max_length = int(model.config.text_config.max_position_embeddings)

    def tokenize(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        batch = hf_tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")
        return batch["input_ids"].long(), batch["attention_mask"].long()

    return model.eval(), tokenize


def fpn_depths(num_layers: int, levels: int = 3) -> tuple[int, ...]:
    """`levels` evenly spaced block indices in 1..num_layers, the last included, deepest first
    (12 blocks -> (12, 8, 4); 4 blocks -> (4, 3, 1)). Index d is hidden_states[d], the output
    of block d (hidden_states[0] is the embedding)."""
    if not 1 <= levels <= num_layers:
        raise ValueError(f"levels must be in [1, {num_layers}], got {levels}")
    return tuple(sorted({max(1, round(num_layers * k / levels)) for k in range(1, levels + 1)},
                        reverse=True))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """§3.2 eq. 1-2: Conv3x3 followed by BatchNorm and ReLU (no conv bias: BN has one)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class AffordanceCLIP(nn.Module):
    """Frozen CLIP + trainable FPN and logit scale/bias (see the module docstring).

    clip: a transformers CLIPModel (frozen here: requires_grad False, kept in eval mode);
    tokenize: its tokenizer as a `Tokenize`; depths: hidden-state indices read by the FPN,
    deepest first (default `fpn_depths(num_layers, 3)`); fpn_dim: C' (default the projection
    dim D).
    """

    def __init__(self, clip: CLIPModel, tokenize: Tokenize, *, depths: Sequence[int] | None = None,
                 fpn_dim: int | None = None, init_scale: float = 10.0) -> None:
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.tokenize = tokenize
        vision = clip.config.vision_config
        num_layers = int(vision.num_hidden_layers)
        self.depths = tuple(int(d) for d in (depths or fpn_depths(num_layers)))
        if not all(1 <= d <= num_layers for d in self.depths):
            raise ValueError(f"depths must be in [1, {num_layers}], got {self.depths}")
        if list(self.depths) != sorted(self.depths, reverse=True):
            raise ValueError(f"depths must be deepest first, got {self.depths}")
        patch = vision.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.image_size = int(vision.image_size)
        self.embed_dim = int(clip.config.projection_dim)
        width = int(vision.hidden_size)
        fpn_dim = int(fpn_dim or self.embed_dim)
        self.global_proj = nn.Sequential(nn.Linear(self.embed_dim, fpn_dim), nn.LayerNorm(fpn_dim),
                                         nn.ReLU(inplace=True))
        self.level_proj = nn.ModuleList(_conv_bn_relu(width, fpn_dim) for _ in self.depths)
        self.out_proj = nn.Conv2d(fpn_dim, self.embed_dim, 1)
        # CLIP parameterises its temperature as a log so it stays positive under SGD.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # CLIP must stay in eval mode whatever the trainer calls (its dropout, if any, stays off).
    def train(self, mode: bool = True) -> AffordanceCLIP:
        super().train(mode)
        self.clip.eval()
        return self

    # Checkpoints hold what training changes: the frozen CLIP is rebuilt from the run's record
    # (hundreds of MB for a real one), so its weights stay out of the state dict.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in [k for k in full if k.startswith(f"{prefix}clip.")]:
            del full[key]
        return full

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("clip.")]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for AffordanceCLIP:\n\t"
                               f"missing keys {missing}, unexpected keys "
                               f"{result.unexpected_keys}")
        return result

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The FPN's, the logit scale's and bias's parameters (what the optimiser gets)."""
        return [p for name, p in self.named_parameters() if not name.startswith("clip.")]

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def _level_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """Pyramid sizes, deepest (coarsest) first: the token grid times 2^(k - (K-1)//2)."""
        middle = (len(self.depths) - 1) // 2
        sizes = []
        for k in range(len(self.depths)):
            factor = 2.0 ** (k - middle)
            sizes.append((max(1, math.ceil(h * factor)), max(1, math.ceil(w * factor))))
        return sizes

    # ---- text ----------------------------------------------------------------------------

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(T, L) token ids -> (T, D) L2-normalised CLIP text embeddings F_Q (§3.1), frozen."""
        with torch.no_grad():
            out = self.clip.text_model(input_ids=input_ids.to(self.device),
                                       attention_mask=attention_mask.to(self.device))
            embeds = self.clip.text_projection(out.pooler_output)
        return F.normalize(embeds.float(), dim=-1)

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Tokenize and encode: (T,) texts -> (T, D)."""
        if isinstance(prompts, str):
            raise TypeError("embed_prompts takes a sequence of texts, not one string")
        return self.encode_text(*self.tokenize(list(prompts)))

    # ---- image ---------------------------------------------------------------------------

    def preprocess(self, images: np.ndarray) -> Tensor:
        """uint8 (B, H, W, 3) -> (B, 3, S, S) float, S the model's image size, CLIP mean/std.
        A plain resize (no centre crop, unlike CLIP's processor), so every output pixel maps
        back onto the whole input and a heat map can be resized back to it."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
        x = torch.from_numpy(np.array(images, copy=True)).to(self.device)  # owned, writable
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    def pixel_embeddings(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> per-pixel visual embeddings F^O (B, D, h', w'), L2-normalised over D;
        h' = 2 H / patch for 3 levels (the finest pyramid level)."""
        height, width = pixel_values.shape[-2:]
        h, w = height // self.patch_size, width // self.patch_size
        clip_dtype = next(self.clip.parameters()).dtype  # a real CLIP may be loaded in bf16
        with torch.no_grad():  # frozen CLIP: no graph through it, which also saves memory
            out = self.clip.vision_model(
                pixel_values=pixel_values.to(clip_dtype), output_hidden_states=True,
                interpolate_pos_encoding=(height, width) != (self.image_size, self.image_size))
            global_embed = self.clip.visual_projection(out.pooler_output)  # F_S (§3.1)
            grids = [out.hidden_states[d][:, 1:] for d in self.depths]  # CLS dropped
        batch = pixel_values.shape[0]
        fused = self.global_proj(global_embed.float())[:, :, None, None]  # F'_S, eq. 1
        for tokens, proj, size in zip(grids, self.level_proj, self._level_sizes(h, w)):
            grid = tokens.float().transpose(1, 2).reshape(batch, -1, h, w)
            if size[0] <= h and size[1] <= w and size != (h, w):
                grid = F.adaptive_avg_pool2d(grid, size)  # coarser: pooling keeps every token's say
            elif size != (h, w):
                grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
            # eq. 3-4: the level plus the parameter-free upsampling of what came before it
            # (F'_S is 1x1, so its upsampling is a broadcast)
            previous = fused if fused.shape[-1] == 1 else F.interpolate(
                fused, size=size, mode="bilinear", align_corners=False)
            fused = proj(grid) + previous
        return F.normalize(self.out_proj(fused), dim=1)  # eq. 5, then per-pixel L2 norm

    def forward(self, pixel_values: Tensor, text_embeds: Tensor) -> Tensor:
        """Per-pixel logits (B, H, W) at the input size: §3.3 eq. 6 as scaled cosine + bias.
        text_embeds (B, D): one query per image (normalised again here, so raw ones work)."""
        if text_embeds.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {text_embeds.shape[0]} text embeddings")
        pixels = self.pixel_embeddings(pixel_values)
        text = F.normalize(text_embeds.to(pixels), dim=-1)
        cosine = torch.einsum("bdhw,bd->bhw", pixels, text)
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * cosine + self.logit_bias
        return F.interpolate(logits[:, None], size=pixel_values.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]

    def heatmaps(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """uint8 (B, H, W, 3) images and B prompts (or one for all) -> float32 (B, H, W) in [0, 1]:
        the sigmoid of the logits, resized back to H x W. Runs in eval mode (BatchNorm's
        running statistics) and restores the previous mode."""
        images = np.asarray(images)
        if isinstance(prompts, str):
            raise TypeError("heatmaps takes a sequence of prompts, not one string")
        prompts = list(prompts)
        if len(prompts) == 1:
            prompts = prompts * images.shape[0]
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        height, width = images.shape[1:3]
        was_training = self.training
        self.eval()
        maps: list[np.ndarray] = []
        try:
            with torch.no_grad():
                for start in range(0, images.shape[0], batch_size):
                    chunk = slice(start, start + batch_size)
                    logits = self(self.preprocess(images[chunk]), self.embed_prompts(prompts[chunk]))
                    # resize the logits, then squash: bilinear on probabilities would blur the
                    # sigmoid's sharp transitions less faithfully than on its argument
                    logits = F.interpolate(logits[:, None], size=(height, width), mode="bilinear",
                                           align_corners=False)[:, 0]
                    maps.append(torch.sigmoid(logits).float().cpu().numpy())
        finally:
            self.train(was_training)
        if not maps:
            return np.zeros((0, height, width), np.float32)
        return np.concatenate(maps).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def pixel_text_loss(logits: Tensor, masks: Tensor, *, balanced: bool = False) -> Tensor:
    """The pixel-text contrastive loss of §3.4 (eq. 7-8), averaged over the batch.

    Reading of §3.4: despite the word "contrastive" (after CRIS [36, 37]), eq. 7 is a per-pixel
    binary cross-entropy of the pixel-text similarity: -log sigma(Y) on pixels of the referring
    mask (P), -log(1 - sigma(Y)) elsewhere (N); eq. 8 averages it over all |P u N| pixels of the
    image. That is the default. The "negatives" are the background pixels of the same image.
    balanced=True (a deviation, off by default): the mean over P and the mean over N weigh one
    half each, so that a small mask counts as much as the background around it (a sample with
    an empty P or N falls back to the other term alone).
    logits (B, H, W), masks bool (B, H, W).
    """
    if logits.shape != masks.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} differ")
    target = masks.to(logits.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # eq. 7
    if not balanced:
        return per_pixel.flatten(1).mean(dim=1).mean()  # eq. 8 per image, then the batch
    per_pixel, target = per_pixel.flatten(1), target.flatten(1)
    n_pos, n_neg = target.sum(dim=1), (1 - target).sum(dim=1)
    pos = (per_pixel * target).sum(dim=1) / n_pos.clamp(min=1)
    neg = (per_pixel * (1 - target)).sum(dim=1) / n_neg.clamp(min=1)
    has_pos, has_neg = (n_pos > 0).to(logits.dtype), (n_neg > 0).to(logits.dtype)
    return ((pos * has_pos + neg * has_neg) / (has_pos + has_neg)).mean()
