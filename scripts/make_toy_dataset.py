"""Write a DSO-style offline toy dataset: ``python scripts/make_toy_dataset.py --out runs/toy/train.npz``.

Per condition k completions (index 0: the conditioning object, then hidden resamples with the same front
view) with static stability labels; see `dso_jax.toy.objects.make_dataset` for the arrays. ``--png`` also
draws the first few conditions' completions (green stable, red unstable). The file is written to a temporary
name and renamed, so a failure (a full disk) leaves no partial dataset. Bad input ends in one line and exit
status 2 (``--debug`` or ``DSO_JAX_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from dso_jax import cli


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def run(argv) -> int:
    import numpy as np

    from dso_jax import workdir
    from dso_jax.toy import objects, render

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--n", type=_positive, default=1000, help="number of conditions")
    ap.add_argument("--k", type=_positive, default=4, help="completions per condition")
    ap.add_argument("--split", choices=("train", "heldout"), default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", action="store_true", help="also write OUT.png with the first 3 conditions")
    args = ap.parse_args(cli.strip_debug(argv))

    if os.path.isdir(args.out):
        raise IsADirectoryError(f"--out {args.out} is a directory; give a file name ending in .npz")
    out = os.path.abspath(args.out if args.out.endswith(".npz") else args.out + ".npz")  # numpy's own naming
    folder = workdir.prepare(os.path.dirname(out), flag="--out")
    data = objects.make_dataset(args.seed, args.n, args.k, args.split)
    os.makedirs(folder, exist_ok=True)
    tmp = out[: -len(".npz")] + ".tmp.npz"
    try:
        np.savez_compressed(tmp, **data)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    st = data["stable"]
    both = np.mean(st.any(axis=1) & ~st.all(axis=1))
    print(
        f"wrote {out}: {args.n} conditions x {args.k} completions ({args.split}), "
        f"stable {st.mean():.3f}, conditions with both labels {both:.3f}"
    )
    if args.png:
        m = min(3, args.n)
        occ = objects.unpack_occ(data["occ_bits"][:m])  # (m, k, R, R, R)
        rows = [
            (occ[i, 0], f"condition {i} ({objects.KINDS[data['kind'][i]]})",
             [(occ[i, j], f"completion {j}" + (" (the object)" if j == 0 else ""), bool(st[i, j])) for j in range(args.k)])
            for i in range(m)
        ]  # fmt: skip
        title = f"toy dataset {os.path.basename(out)}: completions sharing each condition's front view"
        print(f"wrote {render.save_rows(out[: -len('.npz')] + '.png', rows, title=title, legend='static check')}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return cli.run(lambda: run(argv), prog="make_toy_dataset.py")


if __name__ == "__main__":
    sys.exit(main())
