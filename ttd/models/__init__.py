from .loading import ClipBundle, load_model, model_identity  # noqa: F401
