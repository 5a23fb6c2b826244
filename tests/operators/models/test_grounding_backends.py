"""Model-backed grounding backends: tiny random transformers models saved to disk and loaded back
through the backends (no downloads), and a real local HTTP server speaking chat completions.

The tiny models are NOT pretrained: they exercise the real code path (processor, batching,
post-processing, box rescaling), not detection quality.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from operators.models.grounding import Box, GroundingBackend, GroundingOutputError, OracleBackend  # noqa: E402
from operators.models.grounding_backends import (GroundingEndpointError, HFVLMBackend,
                                                 HFZeroShotBackend, OpenAIBackend, make_backend)
from operators.models.loading import ModelNotFoundError

# A NON-square view (H=48, W=64): a swapped axis or a square-frame mistake shows up in the boxes.
H, W = 48, 64


def _views(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def _within_view(boxes: list[Box]) -> bool:
    return all(0 <= b.x0 <= b.x1 <= W and 0 <= b.y0 <= b.y1 <= H for b in boxes)


def _clip_expected(corners: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Reference: clip to the view, drop empty boxes, best score first -> (n, 5)."""
    c = corners.copy()
    c[:, [0, 2]] = c[:, [0, 2]].clip(0, W)
    c[:, [1, 3]] = c[:, [1, 3]].clip(0, H)
    keep = (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    return _canonical(np.concatenate([c[keep], scores[keep, None]], axis=1))


def _canonical(rows: np.ndarray) -> np.ndarray:
    """Rows in a fixed order (random tiny models tie on scores, so score order is ambiguous)."""
    return rows[np.lexsort(np.round(rows, 2).T[::-1])]  # rounded: float32 vs float64 ties


def _as_rows(boxes: list[Box]) -> np.ndarray:
    assert all(a.score >= b.score for a, b in zip(boxes, boxes[1:])), "best score first"
    return _canonical(np.array([[b.x0, b.y0, b.x1, b.y1, b.score] for b in boxes]).reshape(-1, 5))


from tests.tiny_models import build_grounding_dino as _build_grounding_dino  # noqa: E402
from tests.tiny_models import build_llava as _build_llava  # noqa: E402
from tests.tiny_models import build_owlv2 as _build_owlv2  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and spinning threads crawl when the
    # machine's two cores are shared with other processes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def owlv2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("owlv2-random-tiny")
    _build_owlv2(path)
    return path


@pytest.fixture(scope="module")
def grounding_dino_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grounding-dino-random-tiny")
    _build_grounding_dino(path)
    return path


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llava-random-tiny")
    _build_llava(path)
    return path


# --- hf-zero-shot ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _reference_model(path: Path) -> tuple[Any, Any]:
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(path, local_files_only=True)
    return processor, model.eval()


def _raw_detections(path: Path, images: np.ndarray, texts: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The model's own outputs, loaded independently of the backend: (B, Q, 4) cxcywh, (B, Q, C)."""
    processor, model = _reference_model(path)
    padding = {"padding": True} if isinstance(texts[0], str) else {}  # OWL pads to max length
    inputs = processor(images=list(images), text=texts, return_tensors="pt", **padding)
    with torch.inference_mode():
        out = model(**inputs)
    return out.pred_boxes.numpy().astype(np.float64), out.logits.numpy().astype(np.float64)


def test_owlv2_backend_batches_and_rescales_to_view_pixels(owlv2_path: Path) -> None:
    images, prompts = _views(3), ["handle", "spout", "blade of the knife"]
    backend = HFZeroShotBackend(str(owlv2_path), box_threshold=0.0, batch_size=2)
    assert isinstance(backend, GroundingBackend) and backend.model_type == "owlv2"
    boxes = backend.ground(images, prompts, trial=0)
    assert len(boxes) == 3 and all(boxes) and all(_within_view(b) for b in boxes)
    assert all(0 < b.score <= 1 for view in boxes for b in view)

    # Reference from the raw model outputs: OWLv2 pads the view to a max(H, W) square at the
    # bottom/right, so normalised boxes scale by 64 on BOTH axes, then clip to 48 rows.
    pred, logits = _raw_detections(owlv2_path, images, [[p] for p in prompts])
    side = max(H, W)
    for i in range(3):
        cx, cy, w, h = pred[i].T
        corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * side
        scores = 1 / (1 + np.exp(-logits[i].max(axis=1)))
        np.testing.assert_allclose(_as_rows(boxes[i]), _clip_expected(corners, scores), atol=1e-3)
    # The queries of the patches in the padding (rows 48-64) box nothing of the view: dropped.
    assert all(len(view) < pred.shape[1] for view in boxes)

    # Batching does not change the answer; detectors are deterministic (trial ignored).
    single = HFZeroShotBackend(str(owlv2_path), box_threshold=0.0, batch_size=8)
    for a, b in zip(single.ground(images, prompts, trial=3), boxes):
        np.testing.assert_allclose(_as_rows(a), _as_rows(b), atol=1e-4)

    capped = HFZeroShotBackend(str(owlv2_path), box_threshold=0.0, max_boxes=2)
    assert [len(v) for v in capped.ground(images, prompts, 0)] == [2, 2, 2]
    none = HFZeroShotBackend(str(owlv2_path), box_threshold=1.01, batch_size=2)
    assert none.ground(images, prompts, 0) == [[], [], []]
    assert backend.ground(images[:0], [], 0) == []


def test_owlv2_backend_rejects_sentence_prompts_and_bad_input(owlv2_path: Path) -> None:
    backend = HFZeroShotBackend(str(owlv2_path))
    sentence = "the handle of the mug the handle of the mug the handle of the mug"  # > 16 tokens
    with pytest.raises(ValueError, match="short noun phrase"):
        backend.ground(_views(1), [sentence], 0)
    with pytest.raises(ValueError, match="one prompt per image"):
        backend.ground(_views(2), ["handle"], 0)
    with pytest.raises(ValueError, match="uint8"):
        backend.ground(_views(1).astype(np.float32), ["handle"], 0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        backend.ground(_views(1), ["  "], 0)


def test_grounding_dino_backend_batches_and_rescales_to_view_pixels(grounding_dino_path: Path) -> None:
    images, prompts = _views(3, seed=1), ["Handle", "spout", "blade of the knife"]
    backend = make_backend("hf-zero-shot", model_path=str(grounding_dino_path), box_threshold=0.0,
                           text_threshold=0.0)
    backend.batch_size = 2  # 3 images -> batches of 2 + 1
    boxes = backend.ground(images, prompts, trial=1)
    assert len(boxes) == 3 and all(boxes) and all(_within_view(b) for b in boxes)

    # Grounding DINO predicts relative to the unpadded view: x scales by W, y by H. The backend
    # sends the lower-case, period-terminated caption the model was trained on.
    captions = ["handle.", "spout.", "blade of the knife."]
    for i in range(3):
        pred, logits = _raw_detections(grounding_dino_path, images[i:i + 1], captions[i:i + 1])
        cx, cy, w, h = pred[0].T
        corners = np.stack([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H], axis=1)
        scores = (1 / (1 + np.exp(-logits[0]))).max(axis=1)
        np.testing.assert_allclose(_as_rows(boxes[i]), _clip_expected(corners, scores), atol=1e-3)

    backend.box_threshold = 1.01
    assert backend.ground(images, prompts, 0) == [[], [], []]


# --- hf-vlm ------------------------------------------------------------------------------------

def test_vlm_backend_generates_with_seeded_trials(vlm_path: Path) -> None:
    backend = HFVLMBackend(str(vlm_path), style="cogvlm", max_new_tokens=8, temperature=1.0,
                           batch_size=2)
    images, prompts = _views(3), ["the handle", "the spout of the mug", "blade"]
    boxes = backend.ground(images, prompts, trial=0)
    assert len(boxes) == 3 and all(_within_view(b) for b in boxes)
    first = list(backend.last_raw_outputs)
    assert len(first) == 3 and all(isinstance(t, str) and t for t in first)
    backend.ground(images, prompts, trial=0)
    assert backend.last_raw_outputs == first, "same trial, same answers"
    backend.ground(images, prompts, trial=1)
    assert backend.last_raw_outputs != first, "another trial samples differently"
    # The global torch RNG is left alone (the seeding happens in a forked RNG).
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    backend.ground(images[:1], prompts[:1], trial=2)
    assert torch.equal(torch.rand(1), expected)


class _ScriptedVLM(HFVLMBackend):
    """The real backend (model loaded from disk) with scripted answers instead of sampling."""

    answers: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, tuple[str, ...], int]] = []

    def _generate_texts(self, images: np.ndarray, prompts: list[str], trial: int) -> list[str]:
        self.calls.append((len(images), tuple(prompts), trial))
        batch, self.answers = self.answers[:len(images)], self.answers[len(images):]
        return batch


def test_vlm_backend_parses_answers_into_view_pixels(vlm_path: Path) -> None:
    backend = _ScriptedVLM(str(vlm_path), style="cogvlm", batch_size=2)
    backend.answers = [
        "[[100,200,500,750]]",                 # 0-1000 of the view stretched to a square
        "Two: [[0,0,1000,1000]] and [[900,800,1000,900]]",
        "I cannot see any handle here.",
    ]
    boxes = backend.ground(_views(3), ["a", "b", "c"], trial=5)
    assert [c[0] for c in backend.calls] == [2, 1] and {c[2] for c in backend.calls} == {5}
    # W=64, H=48: x * 0.064, y * 0.048
    assert boxes[0] == [Box(6.4, 9.6, 32.0, 36.0)]
    assert boxes[1] == [Box(0.0, 0.0, 64.0, 48.0), Box(57.6, 38.4, 64.0, 43.2)]
    assert boxes[2] == [] and backend.last_raw_outputs[2] == "I cannot see any handle here."

    qwen = _ScriptedVLM(str(vlm_path), style="qwen", template="qwen", json_frame="view")
    qwen.answers = ['```json\n[{"bbox_2d": [8, 4, 40, 30], "label": "handle"}]\n```', "garbage {"]
    boxes = qwen.ground(_views(2), ["a", "b"], trial=0)
    assert boxes == [[Box(8.0, 4.0, 40.0, 30.0)], []]
    assert qwen.last_raw_outputs[1] == "garbage {"
    # LLaVA's processor reports no Qwen patch grid, so "model" pixels are the view's own.
    model_frame = _ScriptedVLM(str(vlm_path), style="qwen")
    model_frame.answers = ['[{"bbox_2d": [8, 4, 40, 30]}]']
    assert model_frame.ground(_views(1), ["a"], 0) == [[Box(8.0, 4.0, 40.0, 30.0)]]
    # Qwen2.5-VL answers in pixels of its resized input: with Qwen2-VL's image processor a
    # 48x64 view becomes 56x56 (multiples of 28), so [28, 28, 56, 56] is the view's lower right.
    from types import SimpleNamespace
    qwen25 = _ScriptedVLM(str(vlm_path), style="qwen")
    qwen25.processor = SimpleNamespace(image_processor=transformers.Qwen2VLImageProcessorPil())
    qwen25.answers = ['[{"bbox_2d": [28, 28, 56, 56]}]']
    assert qwen25.ground(_views(1), ["a"], 0) == [[Box(32.0, 24.0, 64.0, 48.0)]]
    qwen3 = _ScriptedVLM(str(vlm_path), style="qwen", json_frame="norm1000")
    qwen3.answers = ['[{"bbox_2d": [0, 0, 500, 500]}]']
    assert qwen3.ground(_views(1), ["a"], 0) == [[Box(0.0, 0.0, 32.0, 24.0)]]

    strict = _ScriptedVLM(str(vlm_path), style="cogvlm", strict=True)
    strict.answers = ["[[1, 2, 3]]"]
    with pytest.raises(GroundingOutputError, match="image 0"):
        strict.ground(_views(1), ["a"], 0)
    assert strict.last_raw_outputs == ["[[1, 2, 3]]"]


# --- openai ------------------------------------------------------------------------------------

from tests.chat_server import ChatServer as _ChatServer  # noqa: E402
from tests.chat_server import Reply  # noqa: E402


@pytest.fixture
def chat_server() -> Iterator[Callable[[Callable[[int, dict[str, Any]], Reply]], _ChatServer]]:
    servers: list[_ChatServer] = []

    def start(script: Callable[[int, dict[str, Any]], Reply]) -> _ChatServer:
        servers.append(_ChatServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _completion(text: str) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}]}


def _prompt_of(body: dict[str, Any]) -> str:
    return next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")


SECRET = "sk-test-do-not-leak-1234"


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PARTLIFT_TEST_KEY", SECRET)
    return "PARTLIFT_TEST_KEY"


def test_openai_backend_sends_image_and_prompt_and_parses_qwen_boxes(chat_server: Any, api_key: str) -> None:
    # The answer depends on the prompt ("box <k>"), so misaligned concurrent results would show.
    def script(_: int, body: dict[str, Any]) -> Reply:
        k = int(_prompt_of(body).split()[-1])
        return 200, _completion(f'```json\n[{{"bbox_2d": [{k}, 2, {k + 10}, 20], "label": "x"}}]\n```'), 0.05

    server = chat_server(script)
    backend = make_backend("openai", base_url=server.url, model="tiny-vlm", api_key_env=api_key,
                           max_concurrency=2)
    images = _views(5)
    boxes = backend.ground(images, [f"box {k}" for k in range(5)], trial=3)
    assert boxes == [[Box(k, 2, k + 10, 20)] for k in range(5)]
    assert server.max_in_flight <= 2 and len(server.requests) == 5
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["model"] == "tiny-vlm" and body["seed"] == 3 and body["temperature"] == 0.7
    image_part = next(p for p in body["messages"][0]["content"] if p["type"] == "image_url")
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    from PIL import Image
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    k = int(_prompt_of(body).split()[-1])
    np.testing.assert_array_equal(sent, images[k])  # lossless PNG of the exact view
    assert SECRET not in repr(backend)
    backend.ground(images[:1], ["box 0"], trial=4)
    assert server.requests[-1]["body"]["seed"] == 4, "trials differ by seed"


def test_openai_backend_retries_5xx_then_succeeds(chat_server: Any, api_key: str) -> None:
    server = chat_server(lambda i, _: (500, {"error": "busy"}, 0) if i < 2
                         else (200, _completion('[{"bbox_2d": [1, 2, 3, 4]}]'), 0))
    backend = OpenAIBackend(server.url, "m", api_key_env=api_key, max_retries=3, backoff_s=0.01)
    assert backend.ground(_views(1), ["p"], 0) == [[Box(1, 2, 3, 4)]]
    assert len(server.requests) == 3


def test_openai_backend_gives_up_with_endpoint_and_status(chat_server: Any, api_key: str) -> None:
    # The echoed key straddles the 200-character quote limit: scrubbed before the cut.
    server = chat_server(lambda i, _: (503, {"error": "x" * 165 + f" your key {SECRET}"}, 0))
    url_with_password = server.url.replace("http://", "http://user:pw-secret@")
    backend = OpenAIBackend(url_with_password, "m", api_key_env=api_key, max_retries=2, backoff_s=0.01)
    with pytest.raises(ConnectionError) as caught:
        backend.ground(_views(1), ["p"], 0)
    message = str(caught.value)
    assert server.url + "/chat/completions" in message and "HTTP 503" in message
    assert SECRET not in message and SECRET[:10] not in message and "pw-secret" not in message
    assert isinstance(caught.value, GroundingEndpointError)
    assert caught.value.status == 503 and len(server.requests) == 3  # 1 try + 2 retries

    refused = chat_server(lambda i, _: (401, {"error": "bad key"}, 0))
    backend = OpenAIBackend(refused.url, "m", api_key_env=api_key, max_retries=3, backoff_s=0.01)
    with pytest.raises(GroundingEndpointError, match=r"HTTP 401.*PARTLIFT_TEST_KEY") as caught:
        backend.ground(_views(1), ["p"], 0)
    assert len(refused.requests) == 1 and SECRET not in str(caught.value)  # 4xx: no retry


def test_openai_backend_times_out_and_reports_unreachable(chat_server: Any, api_key: str) -> None:
    server = chat_server(lambda i, _: (200, _completion("[[1,2,3,4]]"), 1.0))
    backend = OpenAIBackend(server.url, "m", api_key_env=api_key, timeout_s=0.2, max_retries=1,
                            backoff_s=0.01)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"no reply within 0\.2 s") as caught:
        backend.ground(_views(1), ["p"], 0)
    assert time.monotonic() - started < 1.5 and server.url in str(caught.value)

    dead = chat_server(lambda i, _: (200, {}, 0))
    url = dead.url
    dead.close()
    backend = OpenAIBackend(url, "m", max_retries=1, backoff_s=0.01)
    with pytest.raises(ConnectionError, match="connection failed"):
        backend.ground(_views(1), ["p"], 0)


def test_openai_backend_malformed_replies(chat_server: Any, api_key: str) -> None:
    server = chat_server(lambda i, _: [(200, {"id": "x", "choices": []}, 0),
                                       (200, b"<html>not json</html>", 0),
                                       (200, _completion("no boxes, just words"), 0)][i])
    backend = OpenAIBackend(server.url, "m", api_key_env=api_key, style="cogvlm", max_retries=0)
    with pytest.raises(GroundingOutputError, match="without choices"):
        backend.ground(_views(1), ["p"], 0)
    with pytest.raises(GroundingOutputError, match="not JSON"):
        backend.ground(_views(1), ["p"], 0)
    assert backend.ground(_views(1), ["p"], 0) == [[]]
    assert backend.last_raw_outputs == ["no boxes, just words"]


# --- registry and missing models ---------------------------------------------------------------

def test_make_backend_registry_errors() -> None:
    with pytest.raises(ValueError, match="hf-vlm, hf-zero-shot, openai, oracle"):
        make_backend("owl")
    with pytest.raises(TypeError, match=r"unknown setting\(s\) tempreature; accepted: .*temperature"):
        make_backend("openai", base_url="http://127.0.0.1:1/v1", model="m", tempreature=0.3)
    with pytest.raises(TypeError, match="needs setting"):
        make_backend("hf-zero-shot")
    oracle = make_backend("oracle", noise={"jitter": 0.0, "miss_rate": 0.0}, seed=3)
    assert isinstance(oracle, OracleBackend) and oracle.seed == 3 and oracle.noise.jitter == 0.0
    with pytest.raises(ValueError, match="base_url"):
        make_backend("openai", base_url="127.0.0.1:8000", model="m")


def test_missing_model_path_fails_fast_with_instructions(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    for name in ("hf-zero-shot", "hf-vlm"):
        started = time.monotonic()
        with pytest.raises(ModelNotFoundError) as caught:
            make_backend(name, model_path=str(missing))
        message = str(caught.value)
        assert str(missing) in message and "--local-dir" in message and "label.backend.model_path" in message
        assert time.monotonic() - started < 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFZeroShotBackend(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="local Hugging Face cache"):
        HFZeroShotBackend("partlift-test/not-cached-anywhere")
