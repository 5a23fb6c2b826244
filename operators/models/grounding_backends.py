"""Model-backed grounding backends: transformers detectors and VLMs, and OpenAI-compatible endpoints.

DFC (dense-functional-correspondence) §4.1 / Appendix A.4 box each functional part in every view
with a grounding model, several trials per view. `operators.models.grounding` holds the shared pieces
(`Box`, the `GroundingBackend` protocol, the VLM text parser, prompt templates, the oracle);
this module adds the backends that need weights or a server:

- `HFZeroShotBackend` ("hf-zero-shot"): OWLv2 / OWL-ViT / Grounding DINO through transformers'
  `AutoModelForZeroShotObjectDetection`, post-processed by the processor's own function.
  Deterministic: the trial number changes nothing.
- `HFVLMBackend` ("hf-vlm"): a generative VLM through `AutoModelForImageTextToText`; sampled
  answers (seeded per trial) parsed with `parse_vlm_boxes`.
- `OpenAIBackend` ("openai"): an OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, ...)
  with the view as a base64 PNG data URL; timeouts, retries with backoff, a concurrency limit.
- `make_backend(name, **settings)`: the registry the label stage uses.

Weights are never downloaded here: models load from a local directory (or an id already in the
local Hugging Face cache) with `local_files_only=True`; a missing model fails fast and says how
to provide one. torch / transformers / requests are imported lazily, so importing this module
is cheap. No Ray.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import io
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, ClassVar, Literal, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from operators.models.grounding import (PROMPT_TEMPLATES, Box, GroundingBackend,
                                        GroundingOutputError, OracleBackend, OracleNoise,
                                        _finish_box, parse_vlm_boxes)
from operators.models.loading import (ModelNotFoundError, load_pretrained, resolve_device,
                                      resolve_dtype)
from operators.models.registry import GROUNDING_BACKENDS

JsonFrame = Literal["model", "view", "norm1000"]

# Example models per backend, quoted in the "missing model" message.
_EXAMPLE_MODELS = {
    "hf-zero-shot": "google/owlv2-base-patch16-ensemble",
    "hf-vlm": "Qwen/Qwen2.5-VL-3B-Instruct",
}

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _missing_model_message(backend: str, model_path: str, detail: str) -> str:
    example = _EXAMPLE_MODELS.get(backend, "ORG/MODEL")
    return (f"{backend}: no model at {model_path!r} ({detail}). Models are never downloaded at "
            f"run time; download one first, e.g. `hf download {example} --local-dir "
            f"/models/{example.split('/')[-1]}` (older huggingface_hub: `huggingface-cli download "
            f"... --local-dir ...`), then pass `--set label.backend.model_path=/models/"
            f"{example.split('/')[-1]}`.")


def _load_pretrained(backend: str, model_path: str, loader: Callable[..., Any], **kwargs: Any) -> Any:
    """`loader` under the project's loading policy (`operators.models.loading`): a directory with a
    config.json, or a hub id already in the local cache; nothing downloads."""
    return load_pretrained(
        loader, model_path, None,
        lambda problem: ModelNotFoundError(_missing_model_message(backend, str(model_path), problem)),
        **kwargs)


def _check_views(backend: str, images: np.ndarray, prompts: Sequence[str], trial: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{backend}: images must be a (B, H, W, 3) uint8 array, "
                         f"got {images.dtype} {images.shape}")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"{backend}: images must have a positive size, got {images.shape}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise ValueError(f"{backend}: need one prompt per image: {images.shape[0]} images, "
                         f"prompts={prompts!r:.200}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{backend}: prompt {i} is empty or not text: {prompt!r:.200}")
    if isinstance(trial, bool) or int(trial) != trial or trial < 0:
        raise ValueError(f"{backend}: trial must be an integer >= 0, got {trial!r}")
    return images


def _to_pil(images: np.ndarray) -> list[Any]:
    from PIL import Image
    # PIL images, not arrays: processors guess the channel axis of arrays, which is ambiguous
    # for tiny views (e.g. 3x3x3). Copy: Ray blocks hand out read-only arrays.
    return [Image.fromarray(np.ascontiguousarray(image)) for image in images]


def _check_positive_int(backend: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{backend}: {key} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_template(backend: str, template: str) -> str:
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"{backend}: unknown prompt template {template!r}; "
                         f"known: {', '.join(sorted(PROMPT_TEMPLATES))}")
    return template


def _check_style(backend: str, style: str) -> str:
    if style not in ("cogvlm", "qwen", "auto"):
        raise ValueError(f"{backend}: unknown box style {style!r}; use 'cogvlm', 'qwen' or 'auto'")
    return style


def _check_json_frame(backend: str, frame: str, allowed: tuple[str, ...]) -> str:
    if frame not in allowed:
        raise ValueError(f"{backend}: json_frame must be one of {', '.join(allowed)}; got {frame!r}")
    return frame


def _parse_answers(backend: str, texts: Sequence[str], view_size: tuple[int, int], style: str,
                   strict: bool, model_sizes: Sequence[tuple[int, int] | None]) -> list[list[Box]]:
    out: list[list[Box]] = []
    for i, (text, seen) in enumerate(zip(texts, model_sizes)):
        try:
            out.append(parse_vlm_boxes(text, view_size, style, strict=strict,  # type: ignore[arg-type]
                                       model_image_size=seen))
        except GroundingOutputError as err:
            raise GroundingOutputError(f"{backend}: image {i}: {err}") from None
    return out


# ---------------------------------------------------------------------------------------------
# hf-zero-shot: OWLv2 / OWL-ViT / Grounding DINO
# ---------------------------------------------------------------------------------------------

# model_type -> how the text goes in: one query list per image (OWL) or one lower-case
# period-terminated caption per image (Grounding DINO's training format).
_ZERO_SHOT_TEXT_FORMS = {
    "owlv2": "queries",
    "owlvit": "queries",
    "grounding-dino": "caption",
    "mm-grounding-dino": "caption",
}


class HFZeroShotBackend:
    """The `hf-zero-shot` backend: a transformers open-vocabulary detector from a local path.

    Boxes come from the processor's own `post_process_grounded_object_detection` with
    `target_sizes` = the view's (H, W), so the model-specific geometry (OWLv2 pads to a square at
    the bottom/right, Grounding DINO predicts relative to the unpadded image) is the library's;
    boxes are then clipped to the view, empty ones dropped, sorted by score (best first) and cut
    to `max_boxes`. Detectors are deterministic: `trial` does not change the answer, so T trials
    give T identical votes (use the VLM backends for the paper's sampled trials).

    Not thread-safe: one `ground` call at a time per instance (one model per Ray actor).
    """

    name: ClassVar[str] = "hf-zero-shot"
    template: ClassVar[str] = "zero-shot"  # PROMPT_TEMPLATES key: a short noun phrase
    needs_ground_truth: ClassVar[bool] = False

    def __init__(self, model_path: str, device: str = "cpu", box_threshold: float = 0.1,
                 text_threshold: float = 0.1, batch_size: int = 8, dtype: Any = None,
                 max_boxes: int | None = None) -> None:
        for key, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{self.name}: {key} must be a finite number, got {value!r}")
        self.batch_size = _check_positive_int(self.name, "batch_size", batch_size)
        self.max_boxes = None if max_boxes is None else _check_positive_int(self.name, "max_boxes", max_boxes)
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        self.model_path = str(model_path)

        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        self.processor = _load_pretrained(self.name, self.model_path, AutoProcessor.from_pretrained)
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        self.model = _load_pretrained(self.name, self.model_path,
                                      AutoModelForZeroShotObjectDetection.from_pretrained, **kwargs)
        self.model.to(self.device).eval()
        self.model_type = str(self.model.config.model_type)
        if self.model_type not in _ZERO_SHOT_TEXT_FORMS:
            raise ValueError(f"{self.name}: model type {self.model_type!r} at {self.model_path!r} is "
                             f"not supported; supported: {', '.join(sorted(_ZERO_SHOT_TEXT_FORMS))}")
        self._dtype = next(self.model.parameters()).dtype
        # bf16 autocast only for float32 weights on CUDA: CPU bf16 kernels are slow, and
        # explicitly half-precision weights need no autocast.
        self._autocast = self.device.startswith("cuda") and self._dtype == torch.float32
        self._max_text_tokens = self._text_token_limit()

    def __repr__(self) -> str:
        return (f"HFZeroShotBackend(model_path={self.model_path!r}, model_type={self.model_type!r}, "
                f"device={self.device!r}, box_threshold={self.box_threshold}, "
                f"text_threshold={self.text_threshold}, batch_size={self.batch_size})")

    def _text_token_limit(self) -> int | None:
        limits = [getattr(self.processor.tokenizer, "model_max_length", None),
                  getattr(self.model.config, "max_text_len", None)]
        usable = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
        return min(usable) if usable else None

    def _texts(self, prompts: Sequence[str]) -> list[Any]:
        if _ZERO_SHOT_TEXT_FORMS[self.model_type] == "caption":
            texts: list[Any] = []
            for prompt in prompts:
                caption = prompt.strip().lower()
                texts.append(caption if caption.endswith(".") else caption + ".")
        else:
            texts = [[prompt.strip()] for prompt in prompts]
        if self._max_text_tokens is not None:
            for i, text in enumerate(texts):
                phrase = text if isinstance(text, str) else text[0]
                n_tokens = len(self.processor.tokenizer(phrase)["input_ids"])
                if n_tokens > self._max_text_tokens:
                    raise ValueError(
                        f"{self.name}: prompt {i} has {n_tokens} tokens, more than the "
                        f"{self._max_text_tokens} {self.model_type} takes; detectors want a short "
                        f"noun phrase (prompt template 'zero-shot'), got {phrase!r:.120}")
        return texts

    def ground(self, images: np.ndarray, prompts: Sequence[str], trial: int = 0) -> list[list[Box]]:
        images = _check_views(self.name, images, prompts, trial)
        height, width = int(images.shape[1]), int(images.shape[2])
        texts = self._texts(prompts)
        out: list[list[Box]] = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            out.extend(self._ground_batch(images[start:stop], texts[start:stop], height, width))
        return out

    def _ground_batch(self, images: np.ndarray, texts: list[Any], height: int,
                      width: int) -> list[list[Box]]:
        import torch
        # Captions of a batch pad to the longest; OWL processors pad every query to the
        # tokenizer's max length themselves (their batch concatenation needs that).
        padding = {"padding": True} if _ZERO_SHOT_TEXT_FORMS[self.model_type] == "caption" else {}
        inputs = self.processor(images=_to_pil(images), text=texts, return_tensors="pt", **padding)
        inputs = inputs.to(self.device)
        if self._dtype != torch.float32:
            inputs = inputs.to(dtype=self._dtype)  # casts only the floating tensors
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                    enabled=self._autocast):
            outputs = self.model(**inputs)
        # Post-process in float32 so scaling to pixels does not round again in bf16 (the
        # autocast head's own bf16 outputs are good to ~1 px at 224 px).
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        target_sizes = [(height, width)] * len(images)
        post = self.processor.post_process_grounded_object_detection
        kwargs: dict[str, Any] = {"threshold": self.box_threshold, "target_sizes": target_sizes}
        parameters = inspect.signature(post).parameters
        if "text_threshold" in parameters:
            kwargs["text_threshold"] = self.text_threshold
        if "input_ids" in parameters:
            kwargs["input_ids"] = inputs["input_ids"]
        results = post(outputs, **kwargs)
        out: list[list[Box]] = []
        for result in results:
            scores = result["scores"].float().cpu().numpy()
            corners = result["boxes"].float().cpu().numpy().reshape(-1, 4)
            boxes = []
            for (x0, y0, x1, y1), score in zip(corners, scores):
                box = _finish_box(float(x0), float(y0), float(x1), float(y1), height, width)
                if box is not None and math.isfinite(float(score)):
                    boxes.append(replace(box, score=float(score)))
            boxes.sort(key=lambda b: -b.score)
            out.append(boxes[: self.max_boxes] if self.max_boxes is not None else boxes)
        return out


# ---------------------------------------------------------------------------------------------
# hf-vlm: generative grounding VLM through transformers
# ---------------------------------------------------------------------------------------------


class HFVLMBackend:
    """The `hf-vlm` backend: a generative VLM whose text answer carries boxes.

    Each prompt goes through the processor's chat template with the image, then `generate`
    samples an answer (`temperature` > 0; 0 = greedy); `parse_vlm_boxes(text, (H, W), style)`
    reads the boxes. DFC A.4 queries each view several times: sampling is seeded with
    `seed + trial` per batch, so trials differ and a rerun with the same batching repeats.
    Unparseable answers give [] (or GroundingOutputError with `strict=True`); the raw answers of
    the last call stay in `last_raw_outputs` for debugging.

    Box frames: "cogvlm" answers are in the 0-1000 frame of the padded square; Qwen JSON
    coordinates are read per `json_frame`: "model" = absolute pixels of the image the model saw
    (Qwen2.5-VL; found from the processor's `image_grid_thw`, the view size for processors
    without it), "view" = view pixels, "norm1000" = a 0-1000 frame of the image (Qwen3-VL).

    Subclasses may override `_generate_texts(images, prompts, trial) -> list[str]` (one batch)
    to supply answers from elsewhere; the parsing path stays the same.
    Not thread-safe: one `ground` call at a time per instance.
    """

    name: ClassVar[str] = "hf-vlm"
    needs_ground_truth: ClassVar[bool] = False

    def __init__(self, model_path: str, style: str = "cogvlm", template: str = "cogvlm",
                 device: str = "cpu", max_new_tokens: int = 64, temperature: float = 0.7,
                 batch_size: int = 4, seed: int = 0, strict: bool = False,
                 json_frame: JsonFrame = "model", dtype: Any = None,
                 trust_remote_code: bool = False) -> None:
        self.style = _check_style(self.name, style)
        self.template = _check_template(self.name, template)
        self.json_frame = _check_json_frame(self.name, json_frame, ("model", "view", "norm1000"))
        self.max_new_tokens = _check_positive_int(self.name, "max_new_tokens", max_new_tokens)
        self.batch_size = _check_positive_int(self.name, "batch_size", batch_size)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"{self.name}: temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"{self.name}: seed must be an integer >= 0, got {seed!r}")
        self.temperature, self.seed, self.strict = float(temperature), int(seed), bool(strict)
        self.model_path = str(model_path)
        self.last_raw_outputs: list[str] = []
        self._model_size_cache: dict[tuple[int, int], tuple[int, int] | None] = {}

        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        if torch_dtype is None:
            # Generative VLMs are billions of parameters: bf16 on GPU, float32 on CPU.
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.processor = _load_pretrained(self.name, self.model_path, AutoProcessor.from_pretrained,
                                          trust_remote_code=trust_remote_code)
        self.model = _load_pretrained(self.name, self.model_path,
                                      AutoModelForImageTextToText.from_pretrained,
                                      dtype=torch_dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self._dtype = torch_dtype
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{self.name}: the processor at {self.model_path!r} has no chat "
                             "template; use an instruction-tuned VLM checkpoint")
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            # Decoder-only batches must be left-padded so every answer starts right after its prompt.
            tokenizer.padding_side = "left"

    def __repr__(self) -> str:
        return (f"HFVLMBackend(model_path={self.model_path!r}, style={self.style!r}, "
                f"device={self.device!r}, temperature={self.temperature}, batch_size={self.batch_size})")

    def ground(self, images: np.ndarray, prompts: Sequence[str], trial: int = 0) -> list[list[Box]]:
        images = _check_views(self.name, images, prompts, trial)
        height, width = int(images.shape[1]), int(images.shape[2])
        texts: list[str] = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            batch_texts = self._generate_texts(images[start:stop], list(prompts[start:stop]), int(trial))
            if len(batch_texts) != len(images[start:stop]):
                raise GroundingOutputError(f"{self.name}: got {len(batch_texts)} answers for "
                                           f"{len(images[start:stop])} images")
            texts.extend(str(t) for t in batch_texts)
        self.last_raw_outputs = texts
        seen = self._model_image_size(height, width)
        return _parse_answers(self.name, texts, (height, width), self.style, self.strict,
                              [seen] * len(texts))

    def _model_image_size(self, height: int, width: int) -> tuple[int, int] | None:
        """(H, W) of the frame Qwen JSON coordinates are in; None = the view itself."""
        if self.json_frame == "view":
            return None
        if self.json_frame == "norm1000":
            return (1000, 1000)
        key = (height, width)
        if key not in self._model_size_cache:
            # Qwen2/2.5-VL resize each image to a multiple of patch_size * merge_size; the
            # processor reports the patch grid it used.
            probe = np.zeros((height, width, 3), np.uint8)
            features = self.processor.image_processor(images=_to_pil(probe[None]), return_tensors="np")
            grid = features.get("image_grid_thw") if hasattr(features, "get") else None
            patch = getattr(self.processor.image_processor, "patch_size", None)
            if grid is None or not isinstance(patch, int):
                self._model_size_cache[key] = None
            else:
                _, grid_h, grid_w = (int(v) for v in np.asarray(grid)[0])
                self._model_size_cache[key] = (grid_h * patch, grid_w * patch)
        return self._model_size_cache[key]

    def _generate_texts(self, images: np.ndarray, prompts: list[str], trial: int) -> list[str]:
        """One batch: chat-template each prompt with its image, sample, decode the new tokens."""
        import torch
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
                 for p in prompts]
        texts = [self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                 for chat in chats]
        inputs = self.processor(text=texts, images=_to_pil(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if self._dtype != torch.float32:
            inputs = inputs.to(dtype=self._dtype)
        sampling: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            sampling["temperature"] = self.temperature
        devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
        # fork_rng: seed for this batch without disturbing the process's global RNG streams.
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(self.seed + trial)
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        # Decoder-only models echo the prompt before the answer; encoder-decoders do not.
        if not getattr(self.model.config, "is_encoder_decoder", False):
            generated = generated[:, inputs["input_ids"].shape[1]:]
        return list(self.processor.batch_decode(generated, skip_special_tokens=True))


# ---------------------------------------------------------------------------------------------
# openai: OpenAI-compatible chat endpoint
# ---------------------------------------------------------------------------------------------


class GroundingEndpointError(ConnectionError):
    """An OpenAI-compatible endpoint could not be reached or kept failing. Never holds the API key."""

    def __init__(self, message: str, endpoint: str, status: int | None = None) -> None:
        super().__init__(message)
        self.endpoint, self.status = endpoint, status


_RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
_MAX_BACKOFF_S = 60.0
_BODY_QUOTE_CHARS = 200


def _chat_completions_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"openai: base_url must be an http(s) URL such as "
                         f"http://127.0.0.1:8000/v1, got {base_url!r}")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _png_data_url(image: np.ndarray) -> str:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIBackend:
    """The `openai` backend: a VLM behind an OpenAI-compatible `/v1/chat/completions` endpoint.

    One request per image: a user message with the view as a base64 PNG data URL (`image_url`
    part) and the prompt text; `seed` = seed + trial so trials differ and repeat. Up to
    `max_concurrency` requests run at once (shared by concurrent `ground` calls, so the
    instance is thread-safe). Connection errors, timeouts, 408/429 and 5xx are retried
    `max_retries` times with exponential backoff (`backoff_s * 2**attempt`, or the server's
    Retry-After when longer); then `GroundingEndpointError` (a ConnectionError) names the
    endpoint and the last HTTP status. Other 4xx fail at once. A reply without choices/content
    raises GroundingOutputError. The API key is read from `api_key_env` (no header when unset,
    as for a local vLLM) and sent only as `Authorization: Bearer ...`; it is kept out of repr
    and scrubbed from every error message.

    Qwen JSON boxes are read per `json_frame`: "view" (the server saw the PNG we sent; for
    Qwen2.5-VL that holds when the view sides are multiples of 28) or "norm1000" (Qwen3-VL).
    """

    name: ClassVar[str] = "openai"
    needs_ground_truth: ClassVar[bool] = False

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 style: str = "qwen", template: str = "qwen", timeout_s: float = 30.0,
                 max_retries: int = 3, backoff_s: float = 0.5, max_concurrency: int = 4,
                 temperature: float = 0.7, max_tokens: int = 256, seed: int = 0,
                 strict: bool = False, json_frame: JsonFrame = "view") -> None:
        # Messages show the endpoint without any user:password@ part of the URL.
        self.endpoint = _without_userinfo(_chat_completions_url(base_url))
        self._request_url = _chat_completions_url(base_url)
        if not isinstance(model, str) or not model.strip():
            raise ValueError("openai: model (the served model name) is empty")
        self.model = model
        self.style = _check_style(self.name, style)
        self.template = _check_template(self.name, template)
        self.json_frame = _check_json_frame(self.name, json_frame, ("view", "norm1000"))
        for key, value, low in (("timeout_s", timeout_s, 0.0), ("backoff_s", backoff_s, 0.0),
                                ("temperature", temperature, 0.0)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low) \
                    or (key == "timeout_s" and value <= 0):
                raise ValueError(f"openai: {key} must be a finite number "
                                 f"{'> 0' if key == 'timeout_s' else '>= 0'}, got {value!r}")
        if isinstance(max_retries, bool) or int(max_retries) != max_retries or max_retries < 0:
            raise ValueError(f"openai: max_retries must be an integer >= 0, got {max_retries!r}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"openai: seed must be an integer >= 0, got {seed!r}")
        self.max_concurrency = _check_positive_int(self.name, "max_concurrency", max_concurrency)
        self.max_tokens = _check_positive_int(self.name, "max_tokens", max_tokens)
        self.timeout_s, self.backoff_s = float(timeout_s), float(backoff_s)
        self.max_retries, self.seed = int(max_retries), int(seed)
        self.temperature, self.strict = float(temperature), bool(strict)
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        # One pool per backend: its size is the concurrency limit across concurrent `ground`
        # calls, and its long-lived threads keep their requests.Session (pooled connections).
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency,
                                        thread_name_prefix="partlift-openai")
        self._local = threading.local()
        self.last_raw_outputs: list[str] = []

    def __repr__(self) -> str:
        return (f"OpenAIBackend(endpoint={self.endpoint!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    def _quote_body(self, text: str) -> str:
        """A server's text for an error message: key scrubbed first (a cut key would survive), then cut."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return repr(text[:_BODY_QUOTE_CHARS] + ("..." if len(text) > _BODY_QUOTE_CHARS else ""))

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            import requests
            session = self._local.session = requests.Session()
        return session

    def request_body(self, image: np.ndarray, prompt: str, trial: int) -> dict[str, Any]:
        """The chat-completions request for one view (public so callers can log or inspect it)."""
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _png_data_url(image)}},
                {"type": "text", "text": prompt},
            ]}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed + int(trial),
        }

    def ground(self, images: np.ndarray, prompts: Sequence[str], trial: int = 0) -> list[list[Box]]:
        images = _check_views(self.name, images, prompts, trial)
        height, width = int(images.shape[1]), int(images.shape[2])
        if images.shape[0] == 0:
            self.last_raw_outputs = []
            return []
        texts = list(self._pool.map(lambda i: self._complete(images[i], prompts[i], int(trial)),
                                    range(images.shape[0])))
        self.last_raw_outputs = texts
        seen = (1000, 1000) if self.json_frame == "norm1000" else None
        return _parse_answers(self.name, texts, (height, width), self.style, self.strict,
                              [seen] * len(texts))

    def _complete(self, image: np.ndarray, prompt: str, trial: int) -> str:
        return self._answer_text(self._post_with_retries(self.request_body(image, prompt, trial)))

    def close(self) -> None:
        """Stop the request threads (idle ones also end with the process)."""
        self._pool.shutdown(wait=True)

    def _post_with_retries(self, body: dict[str, Any]) -> Any:
        import requests
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_problem, last_status = "no attempt made", None
        for attempt in range(self.max_retries + 1):
            wait = self.backoff_s * (2 ** attempt)
            try:
                response = self._session().post(self._request_url, json=body, headers=headers,
                                                timeout=self.timeout_s)
            except requests.Timeout:
                last_problem, last_status = f"no reply within {self.timeout_s:g} s", None
            except requests.RequestException as err:
                last_problem, last_status = f"connection failed ({type(err).__name__})", None
            else:
                if response.status_code < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise GroundingOutputError(
                            f"openai: endpoint {self.endpoint} answered HTTP {response.status_code} "
                            f"with a body that is not JSON: {self._quote_body(response.text)}"
                        ) from None
                last_status = response.status_code
                last_problem = f"HTTP {response.status_code}: {self._quote_body(response.text)}"
                if response.status_code not in _RETRY_STATUSES:
                    hint = (f" (check the API key in ${self.api_key_env})"
                            if response.status_code in (401, 403) else "")
                    raise GroundingEndpointError(
                        f"openai: endpoint {self.endpoint} refused the request with "
                        f"{last_problem}{hint}", self.endpoint, last_status)
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, float(retry_after))
            if attempt < self.max_retries:
                time.sleep(min(wait, _MAX_BACKOFF_S))
        raise GroundingEndpointError(
            f"openai: endpoint {self.endpoint} failed after {self.max_retries + 1} attempts "
            f"({self.max_retries} retries); last: {last_problem}", self.endpoint, last_status)

    def _answer_text(self, reply: Any) -> str:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise GroundingOutputError(
                f"openai: endpoint {self.endpoint} sent a reply without choices[0].message.content: "
                f"{self._quote_body(repr(reply))}") from None
        if isinstance(content, list):  # content parts: join the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            raise GroundingOutputError(f"openai: endpoint {self.endpoint} sent non-text content "
                                       f"{type(content).__name__}")
        return content


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def make_oracle(noise: OracleNoise | dict[str, Any] | None = None, seed: int = 0) -> OracleBackend:
    if isinstance(noise, dict):
        noise = OracleNoise(**noise)
    return OracleBackend(noise if noise is not None else OracleNoise(), seed=seed)


def backend_factory(name: str) -> Callable[..., GroundingBackend]:
    """The factory a registered backend names (`operators.models.registry.GROUNDING_BACKENDS`)."""
    if name not in GROUNDING_BACKENDS:
        raise ValueError(f"unknown grounding backend {name!r}; known: "
                         f"{', '.join(sorted(GROUNDING_BACKENDS))}")
    module, attribute = GROUNDING_BACKENDS[name].factory.split(":")
    return getattr(importlib.import_module(module), attribute)


def make_backend(name: str, **settings: Any) -> GroundingBackend:
    """Build the grounding backend registered under `name` with its settings (keyword arguments)."""
    factory = backend_factory(name)
    parameters = inspect.signature(factory).parameters
    accepted = [p for p in parameters if p != "self"]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise TypeError(f"grounding backend {name!r}: unknown setting(s) {', '.join(unknown)}; "
                        f"accepted: {', '.join(accepted)}")
    missing = [p for p, spec in parameters.items()
               if spec.default is inspect.Parameter.empty and p not in settings and p != "self"]
    if missing:
        raise TypeError(f"grounding backend {name!r} needs setting(s) {', '.join(missing)}")
    return factory(**settings)
