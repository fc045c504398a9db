"""Evaluation: TagMask tag selection and caption segmentation (`tagmask`, metrics as SQL in `metrics_sql`) and
segmentation benchmarks in the VOC/Context/COCO/Cityscapes/ADE layouts (`segmentation`)."""
