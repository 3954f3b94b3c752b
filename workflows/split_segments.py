"""Split a segmented MD dataset (``data generate --method md_seeded``) into training and held-out
files by whole segments, stratified by the basin each segment started in.

    python workflows/split_segments.py DATA.h5 --holdout 6 -o OUT_PREFIX

Frames within one segment are correlated in time, so a held-out set made of whole segments
measures generalisation honestly (a random frame split would leak neighbours of every held-out
frame into training). The held-out segments are spread evenly over the segments that started
in 0 < φ < 2 and those that started at φ < 0, in proportion to their counts. Writes
``OUT_PREFIX-train.h5`` and ``OUT_PREFIX-heldout.h5`` (boltzflow datasets whose provenance
records the source file, its checksum and the segments taken). The rule is the library's
(:func:`boltzflow.data.seeded_md.held_out_segments`), which the workflow's data stage also uses
(``[data] holdout = "segments"``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from boltzflow.data import read_dataset, write_dataset
from boltzflow.data.seeded_md import held_out_segments, segment_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="dataset written by data generate --method md_seeded")
    parser.add_argument("--holdout", type=int, default=6, help="held-out segments (6)")
    parser.add_argument("-o", "--output", required=True, help="output prefix")
    args = parser.parse_args(argv)
    ds = read_dataset(args.data)
    provenance_in = ds.attrs["provenance"]
    stats = provenance_in["statistics"]
    counts = np.asarray(stats["frames_per_seed"], dtype=int)
    if counts.sum() != len(ds.positions):
        raise SystemExit(f"{args.data}: segments hold {counts.sum()} rows, not {len(ds)}")
    held = held_out_segments(stats["seed_phi"], args.holdout)
    mask = segment_rows(counts, held)
    for part, rows in (("train", ~mask), ("heldout", mask)):
        provenance = dict(provenance_in)
        provenance["split"] = {
            "source": str(Path(args.data).resolve()),
            "source_checksum": ds.attrs["checksum_sha256"],
            "part": part,
            "heldout_segments": held,
            "rule": "whole segments, spread evenly within each starting basin",
        }
        out = Path(f"{args.output}-{part}.h5")
        write_dataset(
            out,
            ds.positions[rows],
            energies=None if ds.energies is None else ds.energies[rows],
            system=ds.attrs["system"],
            provenance=provenance,
        )
        print(f"{out}: {int(rows.sum())} frames")
    print(json.dumps({"heldout_segments": held}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
