"""SHA-1 and SHA-256 from CPython's own modules: hashlib loads OpenSSL on import (~3-8 ms of every command's
start, and every command imports a digest user). hashlib's where an interpreter is built without them."""

try:
    from _sha1 import sha1
except ImportError:
    from hashlib import sha1

try:
    from _sha256 import sha256  # Python 3.11; 3.12 renamed it _sha2
except ImportError:
    try:
        from _sha2 import sha256
    except ImportError:
        from hashlib import sha256

__all__ = ["sha1", "sha256"]
