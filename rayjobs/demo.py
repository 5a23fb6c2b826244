"""`partlift demo`: the embedded default end to end on a local Ray, with pictures to look at."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image, ImageDraw

from operators.storage import RunRoot, table_columns
from rayjobs.assets_job import ASSETS_TABLE, run_assets_make
from rayjobs.config import PartliftConfig
from rayjobs.render_job import VIEWS_TABLE, run_render
from rayjobs.runtime import StageReport

CONTACT_SHEET = "demo/contact_sheet.png"
SHEET_ASSETS = 4
SHEET_VIEWS = 4
# Distinct colours for part indices in the overlay column (index 0 = first part, usually body).
PART_PALETTE = np.array([[80, 80, 80], [230, 60, 50], [40, 150, 230], [250, 190, 30],
                         [60, 190, 90], [170, 80, 200], [240, 120, 200], [120, 200, 200]],
                        dtype=np.uint8)


def _depth_image(depth: np.ndarray) -> np.ndarray:
    """Near = bright, far = dark, background black."""
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    hit = depth > 0
    if hit.any():
        near, far = depth[hit].min(), depth[hit].max()
        scaled = 1.0 - (depth - near) / max(far - near, 1e-9)
        out[hit] = (40 + 215 * scaled[hit, None]).astype(np.uint8)
    return out


def _part_image(face_id: np.ndarray, face_part: np.ndarray) -> np.ndarray:
    out = np.full(face_id.shape + (3,), 255, dtype=np.uint8)
    hit = face_id >= 0
    if face_part.size:
        out[hit] = PART_PALETTE[face_part[face_id[hit]] % len(PART_PALETTE)]
    else:
        out[hit] = PART_PALETTE[0]
    return out


def contact_sheet(root: RunRoot, n_assets: int = SHEET_ASSETS, n_views: int = SHEET_VIEWS) -> bytes:
    """PNG: per asset and view, columns rgb | depth | mask | ground-truth parts."""
    manifest = root.read_table(ASSETS_TABLE, columns=["asset_id", "category", "face_part"])
    parts_of = {r["asset_id"]: (r["category"], np.asarray(r["face_part"], dtype=np.int64))
                for r in manifest.to_pylist()}
    tiles: list[tuple[str, list[np.ndarray]]] = []
    for shard in root.list_shards(VIEWS_TABLE):
        cols = table_columns(root.read_shard(VIEWS_TABLE, shard, ["asset_id", "view_id", "rgb",
                                                                  "depth", "mask", "face_id"]))
        for asset_id in dict.fromkeys(cols["asset_id"].tolist()):
            rows = np.flatnonzero(cols["asset_id"] == asset_id)
            picks = rows[np.linspace(0, len(rows) - 1, min(n_views, len(rows))).astype(int)]
            category, face_part = parts_of.get(asset_id, ("?", np.zeros(0, np.int64)))
            for r in picks:
                mask = np.repeat(cols["mask"][r][..., None].astype(np.uint8) * 255, 3, axis=2)
                tiles.append((f"{category} {asset_id[:8]} v{cols['view_id'][r]}",
                              [cols["rgb"][r], _depth_image(cols["depth"][r]), mask,
                               _part_image(cols["face_id"][r], face_part)]))
            if len(tiles) >= n_assets * n_views:
                break
        if len(tiles) >= n_assets * n_views:
            break
    if not tiles:
        raise FileNotFoundError(f"no views under {root.display(VIEWS_TABLE)}/ to draw")
    h, w = tiles[0][1][0].shape[:2]
    label_h, gap = 14, 4
    sheet = Image.new("RGB", (4 * (w + gap) + gap, len(tiles) * (h + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, images) in enumerate(tiles):
        y = gap + i * (h + label_h + gap)
        draw.text((gap, y), f"{label}   rgb | depth | mask | parts", fill=(0, 0, 0))
        for j, image in enumerate(images):
            sheet.paste(Image.fromarray(image), (gap + j * (w + gap), y + label_h))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def run_demo(config: PartliftConfig) -> list[StageReport]:
    started = time.time()
    root = RunRoot(config.root, config.storage.options())
    print(f"partlift demo: {config.assets.n} procedural assets -> {root.display()} (local Ray)")
    reports = [run_assets_make(config), run_render(config)]
    root.write_bytes(CONTACT_SHEET, contact_sheet(root))
    print(f"\ndemo finished in {time.time() - started:.1f} s")
    print(f"  contact sheet: {root.display(CONTACT_SHEET)}")
    print(f"  tables:        {root.display()}/{{assets,views,points}}/  (see `partlift status "
          f"--root {config.root}`)")
    return reports
