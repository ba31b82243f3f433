"""Rewriting a snapshot's trees bottom-up: what ``repair snapshots``, ``rewrite`` and
``recover`` share.

A subclass decides, entry by entry, what goes into the new tree
(:meth:`TreeRewriter.edit_node`: the node as it is, a changed node, or ``None`` to
leave it out), and whether a directory left empty stays
(:meth:`TreeRewriter.keep_empty`). Only a tree whose entries changed — or one below
it — is stored anew; every unchanged subtree keeps its ID, so the rewritten snapshot
shares it with the original. A tree is rewritten once per run (once per path, when
the decision depends on the path), however many snapshots reach it.

New trees are encoded as they are made and kept until :meth:`TreeRewriter.flush`
stores them through the shared packing stages (``pack`` → ``upload`` → ``index``),
which a caller does before it saves any snapshot that refers to them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from cairn.repo.codec import encode_blob
from cairn.repo.pack import TREE
from cairn.repo.tree import Node, Tree, encode_tree
from cairn.stages.packing import EncodedBlob, store_blobs

if TYPE_CHECKING:
    from cairn.repo.index import Index
    from cairn.repo.repository import Repository


def show_path(path: bytes) -> str:
    """A tree path for messages (non-UTF-8 bytes escaped)."""
    return path.decode("utf-8", "backslashreplace")


class TreeRewriter:
    """Rewrites trees bottom-up; see the module docstring.

    Notes are what a subclass reports per entry (a loss, an exclusion): it appends
    them relative to the tree being rewritten (starting with ``/name``), and
    :meth:`rewrite` hands them back as full paths, also for a tree met before.
    """

    #: Whether :meth:`edit_node` looks at the path: then a tree met at two paths is
    #: rewritten for each (an exclude pattern may match one and not the other).
    by_path = False

    def __init__(self, repo: Repository, index: Index, level: int) -> None:
        self.repo = repo
        self.index = index
        self.level = level
        self._done: dict[tuple[bytes, bytes], tuple[bytes, list[str]]] = {}
        self.new_trees: list[EncodedBlob] = []
        self.new_ids: set[bytes] = set()
        self.made: dict[bytes, Tree] = {}  # the new trees, readable before the flush
        self.empty: set[bytes] = set()  # IDs of the trees met or made with no entries

    async def load(self, tree_id: bytes, notes: list[str]) -> Tree:
        """The tree to rewrite. A subclass may stand in for one it cannot read
        (noting why); by default the error ends the run."""
        return await self.repo.load_tree(tree_id)

    async def edit_node(self, node: Node, path: bytes, notes: list[str]) -> Node | None:
        """The entry at ``path`` as it goes into the new tree, ``None`` to leave it
        out. A directory's subtree is rewritten after this, by :meth:`rewrite`."""
        return node

    def keep_empty(self, path: bytes) -> bool:
        """Whether the directory at ``path`` stays when nothing is left in it."""
        return True

    async def rewrite(self, tree_id: bytes, path: bytes = b"") -> tuple[bytes, list[str]]:
        """The rewritten tree's ID (``tree_id`` itself when nothing below changed)
        and the notes made below ``path``, as full paths."""
        new_id, notes = await self._rewrite(tree_id, path)
        prefix = show_path(path)
        return new_id, [prefix + note for note in notes]

    async def _rewrite(self, tree_id: bytes, path: bytes) -> tuple[bytes, list[str]]:
        key = (tree_id, path if self.by_path else b"")
        done = self._done.get(key)
        if done is not None:
            return done
        notes: list[str] = []
        tree = await self.load(tree_id, notes)
        changed = bool(notes)
        nodes = []
        for node in tree.nodes:
            child = path + b"/" + node.name
            new = await self.edit_node(node, child, notes)
            if new is None:
                changed = True
                continue
            if new.type == "dir" and new.subtree is not None:
                sub_id, sub_notes = await self._rewrite(new.subtree, child)
                name = "/" + show_path(node.name)
                notes.extend(name + note for note in sub_notes)
                if sub_id in self.empty and not self.keep_empty(child):
                    changed = True
                    continue
                if sub_id != new.subtree:
                    new = dataclasses.replace(new, subtree=sub_id)
            changed = changed or new is not node
            nodes.append(new)
        new_id = self.store(Tree(nodes)) if changed else tree_id
        if not nodes:
            self.empty.add(new_id)
        self._done[key] = (new_id, notes)
        return new_id, notes

    def store(self, tree: Tree) -> bytes:
        """Encode a new tree (once per ID, and not one the index has); its ID."""
        payload = encode_tree(tree)
        tree_id: bytes = self.repo.crypto.blob_id(payload)
        if tree_id not in self.index and tree_id not in self.new_ids:
            stored = encode_blob(self.repo.crypto, TREE, tree_id, payload, self.level)
            self.new_trees.append(EncodedBlob(TREE, tree_id, stored, len(payload)))
            self.new_ids.add(tree_id)
            self.made[tree_id] = tree
        return tree_id

    async def read(self, tree_id: bytes) -> Tree:
        """A tree by ID, new (not stored yet) or from the repository."""
        made = self.made.get(tree_id)
        return made if made is not None else await self.repo.load_tree(tree_id)

    async def flush(self) -> int:
        """Store the new trees (packs, then index: the shared packing stages) before
        any snapshot refers to them; how many there were."""
        if not self.new_trees:
            return 0
        trees, self.new_trees = self.new_trees, []
        packs, _index_files = await store_blobs(self.repo, trees)
        for pack_id, entries in packs:
            self.index.add_pack(pack_id, entries)
        return len(trees)
