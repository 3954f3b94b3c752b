"""Z-matrices of molecules: the order in which atoms are placed and what each one is placed against.

A :class:`ZMatrix` over ``n`` atoms lists the atoms in placement order, ``atoms[0], atoms[1], ...``,
and for each placed atom its reference atoms, all placed before it:

- ``atoms[0]`` sits at the origin (no references);
- ``atoms[1]`` is placed by a bond length r₁ to ``atoms[0]`` (on the +x axis);
- ``atoms[2]`` by a bond r₂ to ``j ∈ {atoms[0], atoms[1]}`` and the angle θ₂ at ``j`` to the
  other one (in the xy-plane, y > 0);
- every later atom ``i`` by a bond rᵢ to ``j``, the angle θᵢ = ∠(i, j, k) at ``j`` and the dihedral
  φᵢ = dihedral(i, j, k, l) (:func:`boltzflow.systems.geometry.dihedral`).

That gives n − 1 bonds, n − 2 angles and n − 3 dihedrals: 3n − 6 internal degrees of freedom,
the rigid translation and rotation fixed by the first three atoms.
:mod:`boltzflow.systems.internal_coords` maps Cartesian positions to these coordinates and back.

:func:`zmatrix_from_bonds` builds one from the bond graph (:func:`zmatrix_from_topology` reads
the graph from an mdtraj or OpenMM topology):

- the root ``atoms[0]`` is a centre of the graph (smallest eccentricity, heavy atoms preferred), so
  that placement chains, along which errors and a flow's mistakes add up, stay short;
- atoms are placed as in a breadth-first search, heavy atoms before hydrogens; each atom's bond
  partner ``j`` is its earliest-placed bonded neighbour;
- ``k`` is the atom ``j`` was placed against (for ``j`` the root: ``atoms[1]``), so ``i–j–k`` is a
  bonded chain;
- ``l`` is, by preference, an already placed *sibling* (another neighbour of ``j``): the torsion
  of a branch is then measured relative to its first sibling (near ±120° for sp³ centres, and
  the one coordinate that carries the chirality of a stereocentre); the first branch of ``j``
  gets the proper torsion along the chain ``i–j–k–l`` with ``l`` a neighbour of ``k``. The same
  pattern (e.g. HB2 placed by the torsion HB2–CB–CA–HB1) as bgflow's protein Z-matrices, used for
  alanine dipeptide by Noé et al. 2019 and by Midgley et al. 2023 (FAB).

Collinear references (a linear group such as a nitrile, θ near π) make a dihedral undefined; give
such molecules a hand-made :class:`ZMatrix` whose references avoid the linear chain.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ZMatrix", "zmatrix_from_bonds", "zmatrix_from_topology"]


@dataclass(frozen=True)
class ZMatrix:
    """Placement order and reference atoms of a molecule's internal coordinates.

    Attributes:
        atoms: the ``n`` atom indices (0-based, topology order) in placement order; a permutation of
            ``range(n)``.
        references: ``n − 1`` triples ``(j, k, l)`` of atom indices, one per ``atoms[1:]``: the
            bond partner ``j``, the angle partner ``k`` and the dihedral partner ``l``, each placed
            earlier;
            ``-1`` where unused (``atoms[1]``: ``(atoms[0], -1, -1)``; ``atoms[2]``: ``(j, k, -1)``
            with ``{j, k} = {atoms[0], atoms[1]}``).
    """

    atoms: tuple[int, ...]
    references: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        atoms = tuple(int(a) for a in self.atoms)
        refs = tuple(tuple(int(r) for r in row) for row in self.references)
        object.__setattr__(self, "atoms", atoms)
        object.__setattr__(self, "references", refs)
        n = len(atoms)
        if n < 3:
            raise ValueError(f"a Z-matrix needs at least 3 atoms, got {n}")
        if sorted(atoms) != list(range(n)):
            raise ValueError(f"ZMatrix.atoms must be a permutation of range({n}), got {atoms}")
        if len(refs) != n - 1 or any(len(row) != 3 for row in refs):
            raise ValueError(f"ZMatrix.references must be {n - 1} triples (j, k, l), got {refs}")
        position = {a: p for p, a in enumerate(atoms)}
        for p, (atom, row) in enumerate(zip(atoms[1:], refs, strict=True), start=1):
            used, unused = row[: min(p, 3)], row[min(p, 3) :]
            if any(r != -1 for r in unused):
                raise ValueError(
                    f"atom {atom} (placed {p}th) has references {row}; only {min(p, 3)} can be "
                    "used there, the rest must be -1"
                )
            if len(set(used)) != len(used) or any(
                r not in position or position[r] >= p for r in used
            ):
                raise ValueError(
                    f"atom {atom} (placed {p}th) has references {row}: they must be distinct "
                    "atoms placed before it"
                )
        if set(refs[1][:2]) != {atoms[0], atoms[1]}:
            raise ValueError(
                f"atoms[2] must be placed against atoms[0] and atoms[1], got {refs[1]}"
            )

    @property
    def n_atoms(self) -> int:
        """Number of atoms n."""
        return len(self.atoms)

    @property
    def n_dof(self) -> int:
        """Internal degrees of freedom, 3n − 6."""
        return 3 * self.n_atoms - 6

    def bond_rows(self) -> list[tuple[int, int]]:
        """``n − 1`` pairs ``(i, j)``: the bond lengths, in placement order."""
        return [(i, row[0]) for i, row in zip(self.atoms[1:], self.references, strict=True)]

    def angle_rows(self) -> list[tuple[int, int, int]]:
        """``n − 2`` triples ``(i, j, k)``: the angles at ``j``, in placement order."""
        return [(i, row[0], row[1]) for i, row in zip(self.atoms[2:], self.references[1:])]

    def dihedral_rows(self) -> list[tuple[int, int, int, int]]:
        """``n − 3`` quadruples ``(i, j, k, l)``: the dihedrals, in placement order."""
        return [(i, *row) for i, row in zip(self.atoms[3:], self.references[2:])]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return {"atoms": list(self.atoms), "references": [list(r) for r in self.references]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZMatrix:
        """The Z-matrix written by :meth:`to_dict` (validated again)."""
        try:
            return cls(tuple(data["atoms"]), tuple(tuple(r) for r in data["references"]))
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"not a Z-matrix dict (needs 'atoms' and 'references'): {err}"
            ) from err


def _adjacency(n_atoms: int, bonds: Iterable[Sequence[int]]) -> list[list[int]]:
    adjacency: list[set[int]] = [set() for _ in range(n_atoms)]
    for bond in bonds:
        if len(bond) != 2:
            raise ValueError(f"a bond is a pair of atom indices, got {tuple(bond)}")
        a, b = (int(v) for v in bond)
        if not (0 <= a < n_atoms and 0 <= b < n_atoms):
            raise ValueError(f"bond ({a}, {b}) out of range for {n_atoms} atoms")
        if a == b:
            raise ValueError(f"bond ({a}, {b}) joins an atom to itself")
        adjacency[a].add(b)
        adjacency[b].add(a)
    return [sorted(s) for s in adjacency]


def _distances(adjacency: list[list[int]], source: int) -> list[int]:
    dist = [-1] * len(adjacency)
    dist[source] = 0
    queue = deque([source])
    while queue:
        a = queue.popleft()
        for b in adjacency[a]:
            if dist[b] < 0:
                dist[b] = dist[a] + 1
                queue.append(b)
    return dist


def zmatrix_from_bonds(
    n_atoms: int,
    bonds: Iterable[Sequence[int]],
    *,
    hydrogens: Sequence[bool] | None = None,
    root: int | None = None,
) -> ZMatrix:
    """A Z-matrix from the bond graph (the rules are in the module docstring).

    Args:
        n_atoms: number of atoms n ≥ 3.
        bonds: pairs ``(a, b)`` of 0-based atom indices; the graph must be connected.
        hydrogens: ``n`` flags, True for hydrogen atoms (placed after the heavy atoms and never
            chosen as root); None treats every atom as heavy.
        root: the atom placed first (at the origin); None picks a centre of the graph.

    Returns:
        The :class:`ZMatrix`; deterministic for a given graph.

    Raises:
        ValueError: fewer than 3 atoms, bad indices, a disconnected graph (names the atoms not
            reached), or a root without neighbours.
    """
    if isinstance(n_atoms, bool) or not isinstance(n_atoms, int) or n_atoms < 3:
        raise ValueError(f"a Z-matrix needs at least 3 atoms, got n_atoms={n_atoms!r}")
    adjacency = _adjacency(n_atoms, bonds)
    is_h = [False] * n_atoms if hydrogens is None else [bool(h) for h in hydrogens]
    if len(is_h) != n_atoms:
        raise ValueError(f"hydrogens must have {n_atoms} flags, got {len(is_h)}")
    reached = _distances(adjacency, 0 if root is None else int(root))
    missing = [a for a, d in enumerate(reached) if d < 0]
    if missing:
        raise ValueError(
            f"the bond graph is not connected: atoms {missing[:20]}"
            f"{'...' if len(missing) > 20 else ''} are not bonded to the rest; internal "
            "coordinates need one molecule"
        )
    if root is None:
        heavy = [a for a in range(n_atoms) if not is_h[a] and len(adjacency[a]) > 0]
        candidates = heavy or list(range(n_atoms))
        # Centre: smallest eccentricity; ties by more neighbours, then lowest index.
        root = min(
            candidates,
            key=lambda a: (max(_distances(adjacency, a)), -len(adjacency[a]), a),
        )
    if not 0 <= root < n_atoms:
        raise ValueError(f"root {root} out of range for {n_atoms} atoms")

    placed_at: dict[int, int] = {root: 0}
    order = [root]
    parent: dict[int, int] = {}
    # Lazy Prim/Dijkstra: key (hydrogen?, placement position of the parent, index); the first pop
    # of an atom carries its earliest-placed neighbour.
    frontier: list[tuple[bool, int, int, int]] = [(is_h[b], 0, b, root) for b in adjacency[root]]
    heapq.heapify(frontier)
    while frontier:
        _, _, atom, par = heapq.heappop(frontier)
        if atom in placed_at:
            continue
        placed_at[atom] = len(order)
        order.append(atom)
        parent[atom] = par
        for b in adjacency[atom]:
            if b not in placed_at:
                heapq.heappush(frontier, (is_h[b], placed_at[atom], b, atom))

    def earliest(atoms: Iterable[int], exclude: set[int]) -> int | None:
        options = [a for a in atoms if a in placed_at and a not in exclude]
        return min(options, key=placed_at.__getitem__) if options else None

    references: list[tuple[int, int, int]] = [(root, -1, -1)]
    j2 = parent[order[2]]
    references.append((j2, order[1] if j2 == root else root, -1))
    for p in range(3, n_atoms):
        i = order[p]
        before = set(order[:p])

        def placed(atoms: Iterable[int], _before: set[int] = before) -> list[int]:
            return [a for a in atoms if a in _before]

        j = parent[i]
        k = parent[j] if j != root else earliest(placed(adjacency[root]), {i})
        assert k is not None  # atoms[1] is a neighbour of the root
        l_atom = earliest(placed(adjacency[j]), {i, k})  # a sibling of i
        if l_atom is None:
            l_atom = earliest(placed(adjacency[k]), {j})  # the chain i-j-k-l
        if l_atom is None:
            l_atom = earliest(before, {j, k})
        assert l_atom is not None  # p >= 3 atoms are placed
        references.append((j, k, l_atom))
    return ZMatrix(tuple(order), tuple(references))


def zmatrix_from_topology(topology: Any, *, root: int | None = None) -> ZMatrix:
    """A Z-matrix from the bonds of an ``mdtraj.Topology`` or an ``openmm.app.Topology``.

    Hydrogens are recognised by element. The topology must hold one molecule with its bonds (an
    mdtraj topology from a PDB gets standard residue bonds; a bare PDB of a non-standard molecule
    needs CONECT records).

    Args:
        topology: mdtraj or OpenMM topology.
        root: see :func:`zmatrix_from_bonds`.
    """
    if hasattr(topology, "getNumAtoms"):  # openmm.app.Topology
        atoms = list(topology.atoms())
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    elif hasattr(topology, "n_atoms") and hasattr(topology, "bonds"):  # mdtraj.Topology
        atoms = list(topology.atoms)
        bonds = [(b[0].index, b[1].index) for b in topology.bonds]
    else:
        raise TypeError(
            f"expected an mdtraj.Topology or openmm.app.Topology, got {type(topology).__name__}"
        )
    hydrogens = [
        a.element is not None and getattr(a.element, "symbol", None) in ("H", "D") for a in atoms
    ]
    return zmatrix_from_bonds(len(atoms), bonds, hydrogens=hydrogens, root=root)
