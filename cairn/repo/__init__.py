"""The repository format: keys and crypto, blob codec, packs, index, trees, snapshots, locks.

The specification is ``docs/format.md``.
"""
