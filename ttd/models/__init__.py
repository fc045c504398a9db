from ttd.models.loading import ClipBundle, load_model, model_identity  # noqa: F401
