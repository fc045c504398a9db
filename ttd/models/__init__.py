from .loading import ClipBundle, load_model  # noqa: F401
