"""``cairn mount``: every snapshot as a read-only FUSE filesystem (pyfuse3 on asyncio).

* :mod:`cairn.mount.layout` — the directories above the snapshots (``snapshots/``,
  ``ids/``, ``hosts/``, ``tags/`` and their ``latest`` links), restic's layout.
* :mod:`cairn.mount.listing` — that layout for the snapshots at hand, reloaded as
  they come and go, and the snapshots' decoded trees (a bounded LRU).
* :mod:`cairn.mount.blobs` — file content: a bounded LRU of decoded blobs filled
  through the shared download stage (``cairn.stages.fetch``), with read-ahead.
* :mod:`cairn.mount.fs` — the FUSE operations: inodes, attributes, listings, reads.
* :mod:`cairn.mount.run` — mounting, serving until unmounted or signalled, and a
  clean unmount.
"""
