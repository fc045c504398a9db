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


def exception_chain(exc: BaseException | None):
    """The exception and its causes (`__cause__`, else `__context__`), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_problem(exc: BaseException) -> str | None:
    """One line for an object-store failure (missing credentials, an unreachable endpoint, a refused request),
    read from botocore's exception classes by name so nothing is imported; None for anything else."""
    for cause in exception_chain(exc):
        kind = type(cause).__name__
        if type(cause).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):
            if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
                return (f"no usable S3 credentials ({cause}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                        "AWS_PROFILE, or run where an instance role applies")
            if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                        "ReadTimeoutError"):
                return f"cannot reach the S3 endpoint ({cause}): check AWS_ENDPOINT_URL and the network"
            if kind == "ClientError":
                error = getattr(cause, "response", {}).get("Error", {})
                return f"S3 refused the request ({error.get('Code', '?')}): {error.get('Message') or cause}"
            return f"S3: {kind}: {cause}"
    return None
