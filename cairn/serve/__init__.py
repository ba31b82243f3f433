"""``cairn serve``: a repository server speaking restic's REST protocol (v1 and v2).

``paths`` parses request paths, ``store`` keeps repositories on disk (atomic,
verified, append-only, quota), ``auth`` checks htpasswd credentials, ``metrics``
counts for Prometheus and ``app`` ties them into an aiohttp application.
This package imports nothing from the rest of cairn: a server holds opaque files, as a
backend does, and never sees a key.
"""
