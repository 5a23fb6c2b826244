"""`partlift eval --benchmark dfc`: the DFC protocol (§5.1, B.1) on a root's procedural assets.

Compares chance, the raw backbone features and every `--model` on the validation assets of the
models' split (and the held-out categories as an extra column). Writes
`<root>/eval/dfc/<name>/`: metrics.json, table.md (DFC Table 1's shape, then Table 2's
within/across-category split) and pairs.png (label transfer and the top discovered matches of a
few pairs).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from operators.settings import ConfigError
from operators.store.readers import RootReader
from operators.store.storage import RunRoot
from operators.store.tables import FEATURE_BLOCKS, VIEWS
from rayjobs.config import EvalJob
from training.correspondence import check_fingerprints, data_fingerprints
from training.evaluation import (Describe, EvalPair, PairFeatures, chance_describer, draw_pairs,
                                 evaluate, markdown_tables, model_describer, raw_describer)
from training.runs import default_run_name, load_model
from training.splits import assign_splits

BENCHMARKS = ("dfc", "affordance", "soco", "instructpart", "agd20k")
DATA_BENCHMARKS = ("soco", "instructpart", "agd20k")  # read --data (a path or `procedural`)
MODEL_KINDS = {"dfc": "dense-correspondence", "affordance": "cast"}
RUN_KINDS = {"dfc": "train/NAME", "affordance": "finetune/NAME"}
PICTURE_PAIRS = 3
PICTURE_POINTS = 8
PICTURE_MATCHES = 10


@dataclass(frozen=True)
class EvalReport:
    name: str
    where: str
    results: dict[str, dict[str, dict[str, float]]]
    table: str
    seconds: float


def _split_settings(records: list[dict[str, Any]], config: EvalJob) -> tuple[float, list, int]:
    """The models' validation split (they must agree), or the config's without a model."""
    found = {(r["config"]["data.val_fraction"], tuple(r["config"]["data.holdout_categories"]),
              r["config"]["data.split_seed"]) for r in records}
    if len(found) > 1:
        raise ConfigError("eval: the models were trained with different data splits "
                          f"({sorted(found)}); evaluate them separately")
    if found:
        fraction, holdout, seed = found.pop()
        return fraction, list(holdout), seed
    return config.data.val_fraction, list(config.data.holdout_categories), config.data.split_seed


def split_label(given: str) -> tuple[str | None, str]:
    """`LABEL=REF` (the row's name in the tables) or a bare `REF` (named by its run)."""
    label, sep, ref = given.partition("=")
    if sep and "://" not in label and "/" not in label:
        if not label.strip() or not ref:
            raise ConfigError(f"eval: --model {given!r}: expected LABEL=KIND/NAME")
        return label.strip(), ref
    return None, given


def run_eval(config: EvalJob, models: list[str], benchmark: str = "dfc", name: str | None = None,
             checkpoint: str = "best", data: str | None = None) -> Any:
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"eval: unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    if data is not None and benchmark not in DATA_BENCHMARKS:
        raise ConfigError(f"eval: --data is for {', '.join(DATA_BENCHMARKS)}; --benchmark "
                          f"{benchmark} reads the root's own assets")
    if benchmark in DATA_BENCHMARKS:
        return run_data_benchmark(config, models, benchmark, name, checkpoint, data)
    if benchmark == "affordance" and not models:
        raise ConfigError("eval: --benchmark affordance scores CAST models: give --model "
                          "finetune/NAME")
    tic = time.perf_counter()
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=False)
    if checkpoint not in ("best", "last") and not str(checkpoint).isdigit():
        raise ConfigError(f"eval: --checkpoint {checkpoint!r}: expected best, last or a step")
    which = int(checkpoint) if str(checkpoint).isdigit() else checkpoint
    trained = {}
    for given in models:
        label, ref = split_label(given)
        model = load_model(root, ref, which)
        kind = model.record.get("model_kind", "dense-correspondence")
        if kind != MODEL_KINDS[benchmark]:
            raise ConfigError(f"eval: --model {ref} is a {model.record.get('kind')} run "
                              f"({kind}); --benchmark {benchmark} scores {RUN_KINDS[benchmark]} "
                              "runs")
        wanted = {k: v for k, v in model.record["fingerprints"].items() if k != "label"}
        check_fingerprints(wanted, data_fingerprints(root, "gt"), f"eval: model {ref}")
        label = label or model.record["name"]
        if label in trained or label in ("chance", "raw features"):
            raise ConfigError(f"eval: two rows would be named {label!r}: give the model a "
                              "label, --model LABEL=KIND/NAME")
        trained[label] = model
    fraction, holdout, seed = _split_settings([m.record for m in trained.values()], config)
    if benchmark == "affordance":
        return run_affordance(config, root, models, trained, (fraction, holdout, seed), name,
                              checkpoint, tic)
    if trained and (fraction, holdout, seed) != (config.data.val_fraction,
                                                 list(config.data.holdout_categories),
                                                 config.data.split_seed) \
            and "data" in config.model_fields_set:
        print("eval: note: the models' own split is used (data.* of this command is ignored: "
              "a model is evaluated on the assets it did not train on)")
    known = (set.intersection(*(set(m.functions) for m in trained.values())) if trained
             else None)
    reader = RootReader(root)
    if not reader.table(FEATURE_BLOCKS).index:
        raise ConfigError(f"eval: {root.display()} has no features/blocks/ (the block cache the "
                          f"describers read): run `partlift lift --root {root.uri}`")
    manifest = {row["asset_id"]: row for row in reader.manifest()}
    splits = assign_splits({a: r["category"] for a, r in manifest.items()}, fraction, holdout,
                           seed)
    sizes = config.eval
    pair_sets = {}
    for split in ("val", "holdout"):
        rows = [manifest[a] for a in sorted(manifest) if splits[a] == split]
        pairs = draw_pairs(reader, rows, n_pairs=sizes.pairs, seed=sizes.seed,
                           max_gt_points=sizes.max_gt_points, pixel_stride=sizes.pixel_stride,
                           functions=known)
        if pairs:
            pair_sets[split] = pairs
    if "val" not in pair_sets:
        raise ConfigError(f"eval: no two validation assets under {root.display()} share a "
                          "function the models know (the DFC ground truth needs procedural "
                          "assets with part frames); add assets (`partlift assets make --root "
                          f"{root.uri} --n N`, then render, label, lift)"
                          + ("" if trained else " or raise data.val_fraction"))
    describers: dict[str, Describe] = {"chance": chance_describer(sizes.seed),
                                       "raw features": raw_describer()}
    for run_name, model in trained.items():
        describers[run_name] = model_describer(model.model, model.text_of)
    size = tuple(int(s) for s in reader.views(pair_sets["val"][0].asset_1, ["mask"])["mask"]
                 .shape[1:3])
    print(f"eval: {benchmark} on {len(pair_sets['val'])} validation pairs"
          + (f" + {len(pair_sets['holdout'])} held-out pairs" if "holdout" in pair_sets else "")
          + f", {len(describers)} describers")
    features = PairFeatures(reader, {})
    results = evaluate(describers, pair_sets, features, size,  # type: ignore[arg-type]
                       progress=lambda line: print(f"eval: {line}"))
    table = markdown_tables(results)
    name = name or default_run_name(benchmark, {"models": models, "eval": sizes.model_dump()})
    where = f"eval/{benchmark}/{name}"
    root.write_json(f"{where}/metrics.json", {
        "benchmark": benchmark, "models": models, "checkpoint": checkpoint,
        "steps": {n: m.step for n, m in trained.items()}, "eval": sizes.model_dump(),
        "split": {"val_fraction": fraction, "holdout_categories": holdout, "seed": seed},
        "results": json.loads(json.dumps(results, default=float)),
        "notes": {"pck": "distance <= k px at 224 px (the release; the paper's text says <)"}})
    root.write_bytes(f"{where}/table.md", table.encode())
    last = list(describers)[-1]
    root.write_bytes(f"{where}/pairs.png",
                     pairs_picture(reader, pair_sets["val"][:PICTURE_PAIRS], describers[last],
                                   features, size))
    seconds = time.perf_counter() - tic
    report = EvalReport(name, root.display(where), results, table, seconds)
    print(f"\neval finished in {seconds:.1f} s: {report.where}/ (metrics.json, table.md, "
          f"pairs.png: {last})\n")
    print(table)
    return report


def run_data_benchmark(config: EvalJob, models: list[str], benchmark: str, name: str | None,
                       checkpoint: str, data: str | None) -> Any:
    """SOCO, InstructPart, AGD20K on public data or their procedural stand-ins."""
    from rayjobs import benchmark_eval
    if data is None:
        raise ConfigError(f"eval: --benchmark {benchmark} needs --data: the dataset's directory "
                          "(its public layout, see the README) or `procedural` (a stand-in "
                          "made from procedural assets)")
    if checkpoint not in ("best", "last") and not str(checkpoint).isdigit():
        raise ConfigError(f"eval: --checkpoint {checkpoint!r}: expected best, last or a step")
    if data != "procedural" and not Path(data).expanduser().is_dir():
        raise ConfigError(f"eval: --data {data}: no such directory (a local copy of the "
                          f"{benchmark} data, or `procedural`)")
    tic = time.perf_counter()
    root = RunRoot(config.root, config.storage.options())
    root.check_reachable(create=not models)
    run = {"soco": benchmark_eval.run_soco, "instructpart": benchmark_eval.run_instructpart,
           "agd20k": benchmark_eval.run_agd20k}[benchmark]
    with tempfile.TemporaryDirectory(prefix="partlift-eval-") as scratch:  # remote roots' stand-ins
        return run(config, root, data, models, checkpoint, name, tic, Path(scratch))


def run_affordance(config: EvalJob, root: RunRoot, models: list[str], trained: dict[str, Any],
                   split: tuple[float, list, int], name: str | None, checkpoint: str,
                   tic: float) -> EvalReport:
    """The affordance protocol (training.affordance_eval) of CAST models."""
    from training.affordance_eval import eval_samples, evaluate_cast, markdown_table
    sizes = config.eval
    samples = eval_samples(root, split, sizes.pairs, sizes.seed)
    if "seen" not in samples:
        raise ConfigError(f"eval: the models' validation assets under {root.display()} have no "
                          "(asset, function) samples")
    print("eval: affordance on " + ", ".join(f"{len(v)} {k} samples" for k, v in
                                             samples.items()) + f", {len(trained)} models")
    results = evaluate_cast(root, trained, samples, sizes.seed)
    table = markdown_table(results)
    name = name or default_run_name("affordance", {"models": models, "eval": sizes.model_dump()})
    where = f"eval/affordance/{name}"
    root.write_json(f"{where}/metrics.json", {
        "benchmark": "affordance", "models": models, "checkpoint": checkpoint,
        "steps": {n: m.step for n, m in trained.items()},
        "samples": {k: [[s.asset_id, s.function, t] for s, t in v] for k, v in samples.items()},
        "split": {"val_fraction": split[0], "holdout_categories": split[1], "seed": split[2]},
        "results": results,
        "notes": {"metrics": "PIAD/LASO per point (IAGNet's definitions); in [0, 1], the table "
                             "in percent",
                  "prompts": "text = the question phrasing; image = a training exemplar of the "
                             "function (samples without one are left out of image/both)"}})
    root.write_bytes(f"{where}/table.md", table.encode())
    seconds = time.perf_counter() - tic
    print(f"\neval finished in {seconds:.1f} s: {root.display(where)}/ (metrics.json, "
          "table.md)\n")
    print(table)
    return EvalReport(name, root.display(where), results, table, seconds)


def pairs_picture(reader: RootReader, pairs: list[EvalPair], describe: Describe,
                  features: PairFeatures, size: tuple[int, int]) -> bytes:
    """Per pair: label transfer of a few ground-truth points (dot = source, ring = predicted,
    cross = true target), then the top discovered matches as lines."""
    from operators.metrics.correspondence import discovery_scores
    height, width = size
    sheet = Image.new("RGB", (4 * width, max(len(pairs), 1) * height), "white")
    draw = ImageDraw.Draw(sheet)
    colours = [tuple(int(c) for c in np.random.default_rng(i).integers(40, 230, 3))
               for i in range(max(PICTURE_POINTS, PICTURE_MATCHES))]
    for row, pair in enumerate(pairs):
        rgb_1 = reader.table(VIEWS).arrays(pair.asset_1, ["rgb"])["rgb"][pair.view_1]
        rgb_2 = reader.table(VIEWS).arrays(pair.asset_2, ["rgb"])["rgb"][pair.view_2]
        top = row * height
        for column, image in enumerate((rgb_1, rgb_2, rgb_1, rgb_2)):
            sheet.paste(Image.fromarray(np.asarray(image)), (column * width, top))
        feat_1 = features(pair.asset_1, pair.view_1)
        feat_2 = features(pair.asset_2, pair.view_2)
        keys = (f"{pair.asset_1}/{pair.view_1}", f"{pair.asset_2}/{pair.view_2}")
        pick = np.linspace(0, len(pair.truth) - 1, min(PICTURE_POINTS, len(pair.truth))).astype(int)
        source = pair.truth[pick, :2]
        d_src, _ = describe(feat_1, source, size, pair.function, keys[0])
        d_tgt, _ = describe(feat_2, pair.objects_2, size, pair.function, keys[1])
        predicted = pair.objects_2[np.argmax(d_src @ d_tgt.T, axis=1)]
        for k, (s, p, t) in enumerate(zip(source, predicted, pair.truth[pick, 2:])):
            c = colours[k]
            draw.ellipse([s[0] - 3, top + s[1] - 3, s[0] + 3, top + s[1] + 3], fill=c)
            draw.ellipse([width + p[0] - 5, top + p[1] - 5, width + p[0] + 5, top + p[1] + 5],
                         outline=c, width=2)
            draw.line([width + t[0] - 3, top + t[1] - 3, width + t[0] + 3, top + t[1] + 3], fill=c)
            draw.line([width + t[0] - 3, top + t[1] + 3, width + t[0] + 3, top + t[1] - 3], fill=c)
        lattice_1 = pair.objects_1[pair.lattice_1]
        d_1, _ = describe(feat_1, lattice_1, size, pair.function, keys[0])
        matches, scores, _ = discovery_scores(d_1 @ d_tgt[pair.lattice_2].T, lattice_1,
                                              pair.objects_2[pair.lattice_2])
        for k, index in enumerate(np.argsort(-scores, kind="stable")[:PICTURE_MATCHES]):
            u1, v1, u2, v2 = matches[index]
            draw.line([2 * width + u1, top + v1, 3 * width + u2, top + v2], fill=colours[k],
                      width=2)
        draw.text((4, top + 2), pair.function, fill=(0, 0, 0))
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()
