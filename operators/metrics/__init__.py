"""Quality measures, numpy/scipy only: the lowest layer, so benchmarks, trainers, evaluation and
scoring all compute a metric the same way. Each is unit-tested on hand-built cases whose answer
is computed by hand (tests/operators/metrics/).

- `segmentation`: mask IoU, point precision and recall of per-point scores, and InstructPart's
  referring-segmentation metrics (gIoU, cIoU, P@50, P@50:95).
- `probes`: kNN and closed-form ridge probes of features, accuracy and balanced accuracy.
- `correspondence`: dense functional correspondence (DFC): ground truth, PCK, discovery F1/AP.
- `affordance`: 3D per-point affordance (aIoU, AUC, SIM, MAE) and 2D heat maps (KLD, SIM, NSS).
- `keypoints`: SOCO's PCK@alpha (CC / SOC / Cross-SOC candidates, per-image and per-category).
"""
