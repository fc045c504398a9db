"""Exceptions that reach users as one clear line (the CLI prints them without a traceback)."""


class TTDError(Exception):
    """A user mistake or an unusable input: the message names the problem and the fix."""


class SchemaError(TTDError):
    """A table does not match its versioned schema, or was written with an unknown schema version."""


class UnsafeQueryError(TTDError):
    """A SQL statement tried to write or to read outside the store."""


class ImageDecodeError(Exception):
    """A sample's image bytes cannot be decoded (zero bytes, not an image, corrupt, too large)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
