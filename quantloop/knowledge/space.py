"""The AtomSpace behind the knowledge store: OpenCog Hyperon's GroundingSpace (PyPI `hyperon`), queried with
MeTTa patterns, its atoms written to and read back from MeTTa text.

hyperon 0.2.10's atom index decodes the ids of its stored leaf atoms (symbols, numbers, strings) wrongly from
the 1025th distinct one on (trie.rs TrieKey::value, trueagi-io/hyperon-experimental issue #1076): any query
that returns such an atom aborts the process. So the atoms are kept in several GroundingSpaces ("shards"),
each holding at most MAX_KEYS distinct leaf atoms; a pattern is matched in every shard and the answers joined.
A conjunction `(, A B)` is matched within one shard; the store joins across kinds in Python instead.
Every atom and pattern is also re-read from its MeTTa text before it reaches a space: values made in Python
(hyperon.ValueAtom) are not hashed by the index, and each one would take a key of its own.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from hyperon import GroundingSpaceRef, MeTTa
from hyperon.atoms import Atom, AtomKind, E

MAX_KEYS = 1000  # under the 1024 leaf atoms one hyperon 0.2.10 GroundingSpace indexes correctly
LEAF = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s()"]+')  # a string literal, or a symbol / number / variable


def leaf_texts(text: str) -> set[str]:
    """The distinct leaf atoms of an atom's MeTTa text (variables left out): one index key each, at most."""
    return {t for t in LEAF.findall(text) if not t.startswith("$")}


def substitute(pattern: Atom, bindings: dict) -> Atom:
    """The pattern with its variables replaced by their bound atoms."""
    kind = pattern.get_metatype()
    if kind == AtomKind.VARIABLE:
        return bindings.get(str(pattern)[1:], pattern)
    if kind == AtomKind.EXPR:
        return E(*[substitute(c, bindings) for c in pattern.get_children()])
    return pattern


class ShardedSpace:
    """A set of atoms (no duplicates) in hyperon GroundingSpaces of at most MAX_KEYS leaf keys each."""

    def __init__(self, atoms: Iterable[Atom] = (), parsed: bool = False):
        self.metta = MeTTa()  # its parser and tokenizer: numbers and strings become grounded atoms
        self._shards: list[tuple[GroundingSpaceRef, set[str]]] = []
        self._text: dict[str, Atom] = {}  # MeTTa text of every atom -> the atom, in insertion order
        for a in atoms:
            self.add(a, parsed)

    def parse(self, text: str) -> list[Atom]:
        """MeTTa text -> atoms (SyntaxError on malformed text)."""
        return self.metta.parse_all(text)

    def native(self, atom: Atom) -> Atom:
        """The atom as MeTTa's parser makes it (numbers and strings as hyperon's own grounded values)."""
        return self.metta.parse_single(str(atom))

    def add(self, atom: Atom, parsed: bool = False) -> bool:
        """Add one atom (parsed: made by a MeTTa parser already); False when it is there already."""
        text = str(atom)
        if text in self._text:
            return False
        if not parsed:
            atom = self.native(atom)
        keys = leaf_texts(text)
        if not self._shards or len(self._shards[-1][1] | keys) > MAX_KEYS:
            self._shards.append((GroundingSpaceRef(), set()))
        space, held = self._shards[-1]
        space.add_atom(atom)
        held |= keys
        self._text[text] = atom
        return True

    def __len__(self) -> int:
        return len(self._text)

    def __contains__(self, atom: Atom) -> bool:
        return str(atom) in self._text

    def texts(self) -> Iterator[str]:
        return iter(self._text)

    def atoms(self) -> Iterator[Atom]:
        return iter(self._text.values())

    @property
    def shards(self) -> int:
        return len(self._shards)

    def match(self, pattern: Atom | str) -> list[dict[str, Atom]]:
        """Every binding of the pattern's variables (name without '$' -> atom) that makes it an atom of the space."""
        pattern = self.metta.parse_single(pattern if isinstance(pattern, str) else str(pattern))
        out = []
        for space, _ in self._shards:
            for b in space.query(pattern):
                out.append({k: v for k, v in b.items()})
        return out

    def query(self, pattern: Atom | str) -> list[Atom]:
        """The atoms matching a MeTTa pattern (variables written $name), each as stored."""
        if isinstance(pattern, str):
            pattern = self.metta.parse_single(pattern)
        return [substitute(pattern, b) for b in self.match(pattern)]

    def remove_where(self, keep) -> int:
        """Keep only the atoms for which keep(atom) is true (the index never frees a key, so the shards are rebuilt)."""
        kept = [a for a in self._text.values() if keep(a)]
        removed = len(self._text) - len(kept)
        self._shards, self._text = [], {}
        for a in kept:
            self.add(a, parsed=True)
        return removed


def value(atom: Atom):
    """The Python value of a grounded atom (number, string, bool), or the name of a symbol."""
    if atom.get_metatype() == AtomKind.GROUNDED:
        return atom.get_object().value
    return str(atom)
