"""Run the shapes demo's training stages in order within a deadline, then pack the run
folder into pieces small enough to bring back from a lent GPU machine.

    python examples/shapes_train_all.py RUN --minutes 8 --pieces OUT [--restore DIR] [--gpus 2]

- `--restore DIR` first unpacks pieces (run-*.tar.xz.NN) that an earlier call brought back,
  so the stages resume from the checkpoints inside them.
- Stages whose output part already exists are skipped; the others run with --resume and
  --max-minutes set to what is left of the deadline, so an unfinished stage ends with a
  checkpoint (exit status 3) and the script goes straight to packing.
- With two GPUs, qat-binary and qat-ternary run at once, one on each.
- The pieces hold the run's parts (float16) and, for an unfinished stage, its newest
  checkpoint; older checkpoints and finished stages' checkpoints are left out. `--slim`
  drops AdamW's moments from that checkpoint (resuming restarts AdamW with a ramp).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bonsai_mlx.shapes.trainer import strip_moments

PARTS = {"vae": "vae", "dit": "transformer", "qat-binary": "transformer-binary", "qat-ternary": "transformer-ternary"}
PIECE_BYTES = 15 * 2**20
PACK_MINUTES = 0.75  # kept back from the deadline for packing


def restore(pieces: Path, parent: Path) -> None:
    files = sorted(pieces.glob("run-*.tar.xz.*"))
    if not files:
        return
    runs = {f.name.rsplit(".tar.xz.", 1)[0] for f in files}
    if len(runs) > 1:
        raise SystemExit(f"{pieces} holds the pieces of several runs ({', '.join(sorted(runs))}); keep one")
    parent.mkdir(parents=True, exist_ok=True)
    joined = parent / "restore.tar.xz"
    with open(joined, "wb") as out:
        for f in files:
            out.write(f.read_bytes())
    with tarfile.open(joined) as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not (m.isfile() or m.isdir()) or Path(m.name).is_absolute()
               or ".." in Path(m.name).parts]
        if bad:
            raise SystemExit(f"the pieces hold entries that are not plain files inside the run: {bad[:3]}")
        tar.extractall(parent, members=members)
    joined.unlink()
    print(f"restored {len(files)} pieces into {parent}", flush=True)


def run_stages(stages, run: Path, deadline: float, extra: list[str], gpus: list[str]) -> bool:
    """Start the stages at once, one per GPU in `gpus` (round robin); True when all finish."""
    minutes = (deadline - time.time()) / 60 - PACK_MINUTES
    if minutes < 0.5:
        return False
    procs = []
    for i, stage in enumerate(stages):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[i % len(gpus)]) if gpus else None
        cmd = [sys.executable, "-m", "bonsai_mlx.shapes.train", stage, str(run), "--resume",
               "--max-minutes", f"{minutes:.2f}", *extra]
        print("$", " ".join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(c not in (0, 3) for c in codes):
        raise SystemExit(f"a stage failed: {dict(zip(stages, codes))}")
    return all(c == 0 for c in codes)


def pack(run: Path, out: Path, slim: bool = False) -> None:
    def keep(info: tarfile.TarInfo):
        p = Path(info.name)
        if "checkpoints" in p.parts and p.suffix in (".safetensors", ".json"):
            stage = p.parts[p.parts.index("checkpoints") + 1]
            if stage in PARTS and (run / PARTS[stage]).is_dir():
                return None  # the stage is done: its part replaces its checkpoints
            found = sorted((run / "checkpoints" / stage).glob("step-*.safetensors"))
            if not found or p.stem != found[-1].stem:
                return None
        return info

    if slim:  # unfinished stages' newest checkpoints lose AdamW's moments
        for stage, part in PARTS.items():
            found = sorted((run / "checkpoints" / stage).glob("step-*.safetensors"))
            if found and not (run / part).is_dir():
                strip_moments(found[-1])
    out.mkdir(parents=True, exist_ok=True)
    whole = out / "run.tar.xz"
    with tarfile.open(whole, "w:xz", preset=3) as tar:
        tar.add(run, arcname=run.name, filter=keep)
    data = whole.read_bytes()
    whole.unlink()
    for i in range(0, len(data), PIECE_BYTES):
        (out / f"run-{run.name}.tar.xz.{i // PIECE_BYTES:02d}").write_bytes(data[i:i + PIECE_BYTES])
    print(f"packed {run} into {len(data) / 1e6:.1f} MB, {-(-len(data) // PIECE_BYTES)} pieces in {out}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--minutes", type=float, required=True, help="deadline for training and packing")
    ap.add_argument("--pieces", type=Path, required=True, help="folder for the packed run")
    ap.add_argument("--restore", type=Path, help="folder of pieces from an earlier call")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--stages", nargs="+", default=list(PARTS))
    ap.add_argument("--slim", action="store_true", help="pack unfinished stages' checkpoints without AdamW's moments")
    ap.add_argument("--pack-only", action="store_true", help="only pack RUN (after --restore)")
    a, extra = ap.parse_known_args()
    deadline = time.time() + 60 * a.minutes
    if a.restore:
        restore(a.restore, a.run.parent)
    gpus = [str(i) for i in range(a.gpus)] if a.gpus > 1 else []
    todo = [] if a.pack_only else [s for s in a.stages if not (a.run / PARTS[s] / "config.json").exists()]
    done = True
    for group in (["vae"], ["dit"], ["qat-binary", "qat-ternary"]):
        stages = [s for s in group if s in todo]
        if stages and done:
            done = run_stages(stages, a.run, deadline, extra, gpus) if len(stages) > 1 and gpus else all(
                run_stages([s], a.run, deadline, extra, gpus[:1]) for s in stages)
    pack(a.run, a.pieces, a.slim)
    print("all stages done" if done else "stopped at the deadline; run again with --restore", flush=True)
    return 0 if done else 3


if __name__ == "__main__":
    raise SystemExit(main())
