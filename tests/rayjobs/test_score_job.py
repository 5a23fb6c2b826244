"""`partlift score` on the shared local Ray: a correspondence model with a mask head and a CAST
run (tiny, from scratch) score the shared root's 8 assets into scores/<name>/; a rerun resumes
with nothing redone, other models under the same name are refused, and a query ranks the
collection by functional descriptor."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from operators.settings import ConfigError
from operators.store.readers import read_arrays
from operators.store.storage import RunRoot
from rayjobs.config import ScoreJob, load_config
from rayjobs.score_job import run_score, score_output
from tests.conftest import DFC_ROOT_SETTINGS

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]

SCORE = ["score.n_points=64", "score.mask_stride=8", "lift.backbone.name=dinov2-random-tiny"]


@pytest.fixture(scope="module")
def models(dfc_root: str, mask_model: str, cast_model: str) -> str:
    return dfc_root


def score_config(root: str, *extra: str) -> ScoreJob:
    return load_config((), [*DFC_ROOT_SETTINGS, *SCORE, *extra], root=root, model=ScoreJob)


def test_scores_land_per_asset_and_function_resume_and_answer_a_query(models: str,
                                                                     tmp_path: Path) -> None:
    root = RunRoot(models)
    config = score_config(models, "score.models=[train/sm, finetune/sc]", "score.name=s1")
    report, _ = run_score(config)
    assert (report.ok, report.failed) == (8, 0)
    points = read_arrays(root, score_output("s1").commit)
    functions = set(points["function"].tolist())
    assert len(points["asset_id"]) == 8 * len(functions) and len(set(points["asset_id"])) == 8
    assert len(set(zip(points["asset_id"], points["function"], strict=True))) == \
        len(points["asset_id"])                                   # no duplicated rows
    assert points["score"].shape == (8 * len(functions), 64)
    assert ((points["score"] >= 0) & (points["score"] <= 1)).all()
    assert not np.isnan(points["score_mask"]).all()              # the mask head scored
    assert not np.isnan(points["score_cast"]).any()              # CAST scored every point
    assert np.array_equal(points["score"], points["score_cast"])  # CAST's is the score
    seen = points["n_views_seen"] > 0
    norms = np.linalg.norm(points["embedding"].astype(np.float32), axis=2)
    assert np.allclose(norms[seen], 1, atol=2e-3) and np.allclose(norms[~seen], 0)
    assert np.allclose(np.linalg.norm(points["descriptor"], axis=1), 1, atol=1e-4)
    masks = read_arrays(root, score_output("s1").tables[0])
    assert len(masks["asset_id"]) == 8 * 4 * len(functions)   # 4 views a function
    assert masks["mask"].shape[1:] == (7, 7)                  # 56 px, a sample every 8
    # a root of the same assets, never rendered: they are rendered first and the backbone
    # runs on them; the scores equal those from the cached blocks (float16) within 0.02
    fresh_root = tmp_path / "fresh"
    shutil.copytree(models, fresh_root, ignore=lambda d, names: [
        n for n in names if d == models and n not in ("assets", "meshes", "_partlift.json")])
    streamed, _ = run_score(score_config(
        str(fresh_root), f"score.models=[{models}/runs/train/sm, {models}/runs/finetune/sc]",
        "score.name=s2", "score.functions=[pour-with]"))
    assert streamed.stage == "score/s2" and streamed.ok == 8
    assert read_arrays(RunRoot(str(fresh_root)), "views", ["view_id"])["view_id"].size == 8 * 4
    fresh = read_arrays(RunRoot(str(fresh_root)), score_output("s2").commit)
    cached = [i for i, f in enumerate(points["function"]) if f == "pour-with"]
    assert np.array_equal(fresh["asset_id"], points["asset_id"][cached])
    assert np.abs(fresh["descriptor"] - points["descriptor"][cached]).max() < 0.02
    assert np.abs(np.nan_to_num(fresh["score_mask"]) -
                  np.nan_to_num(points["score_mask"][cached])).max() < 0.02
    # a folder of mesh files into an empty root: scanned, rendered, scored in one command
    meshes = tmp_path / "meshes" / "mug"
    meshes.mkdir(parents=True)
    for mesh in sorted((Path(models) / "meshes" / "procedural").glob("*.ply"))[:2]:
        shutil.copy(mesh, meshes / mesh.name)
    scanned, _ = run_score(score_config(
        str(tmp_path / "scanned"), f"score.models=[{models}/runs/train/sm]", "score.name=s3",
        f"assets.input={tmp_path / 'meshes'}", "score.functions=[pour-with]"))
    assert (scanned.ok, scanned.failed) == (2, 0)
    assert len(read_arrays(RunRoot(str(tmp_path / "scanned")),
                           score_output("s3").commit)["asset_id"]) == 2
    # the same name again: nothing to do
    again, _ = run_score(config)
    assert (again.ok, again.skipped_done) == (0, 8)
    # another model under the same name: refused, naming what differs
    with pytest.raises(ConfigError, match="score.models"):
        run_score(score_config(models, "score.models=[train/sm]", "score.name=s1"))
    # the query: the other assets of the function, best first, the asset itself excluded
    asset, function = str(points["asset_id"][0]), str(points["function"][0])
    _, query = run_score(score_config(models, "score.models=[train/sm, finetune/sc]",
                                      "score.name=s1", f"score.query={asset}:{function}",
                                      "score.top_k=3"))
    # by hand: dot products of the descriptors of the function's other assets
    rows = [i for i, f in enumerate(points["function"]) if f == function and
            points["asset_id"][i] != asset]
    similarity = {str(points["asset_id"][i]): float(points["descriptor"][i] @
                                                    points["descriptor"][0]) for i in rows}
    expected = sorted(similarity, key=lambda a: -similarity[a])[:3]
    assert [m.asset_id for m in query.matches] == expected
    assert [round(m.similarity, 5) for m in query.matches] == \
        [round(similarity[a], 5) for a in expected]
    assert root.read_bytes(f"scores/s1/queries/{asset}-{function}.png")[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="holds no row for asset nope"):
        run_score(score_config(models, "score.models=[train/sm, finetune/sc]", "score.name=s1",
                               f"score.query=nope:{function}"))
