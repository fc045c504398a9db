"""The stages, each a plain function over a corpus and a store, all on one engine (`engine`: plan once, distribute,
account): `index`, `parse` (candidate tags), `score` (pixel-tag relevancy and pseudo-labels; its batching, GPU
pipeline and Ray actors beside it), `distill` (TTD fine-tuning, Ray Train in `distill_ray`, refreshed targets in
`refresh`). Evaluation is in `ttd.eval`."""
