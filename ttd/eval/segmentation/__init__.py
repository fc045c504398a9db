"""Open-vocabulary semantic segmentation evaluation on the standard eval sets (VOC, Context, COCO, Cityscapes, ADE).

datasets.py reads the layouts, infer.py is the protocol (sliding windows, scales, flip, PAMR, background), metrics.py
the counts and the SQL metrics, run.py the stage that commits them (ttd/cli/segmentation.py: the `ttd evaluate`
body). docs/SEGEVAL.md.
"""

from ttd.eval.segmentation.datasets import DATASETS, SegDataset, open_dataset  # noqa: F401
from ttd.eval.segmentation.infer import Segmenter  # noqa: F401
from ttd.eval.segmentation.run import run_segeval  # noqa: F401
