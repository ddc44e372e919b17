"""Write a DSO-style offline toy dataset: ``python scripts/make_toy_dataset.py --out runs/toy/train.npz``.

Per condition k completions (index 0: the conditioning object, then hidden resamples with the same front
view) with static stability labels; see `dso_jax.data.toy.make_dataset` for the arrays. ``--png`` also
draws the first few conditions' completions (green stable, red unstable).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    import numpy as np

    from dso_jax.data import toy, toy_render

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--n", type=int, default=1000, help="number of conditions")
    ap.add_argument("--k", type=int, default=4, help="completions per condition")
    ap.add_argument("--split", choices=("train", "heldout"), default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", action="store_true", help="also write OUT.png with the first 3 conditions")
    args = ap.parse_args(argv)

    data = toy.make_dataset(args.seed, args.n, args.k, args.split)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **data)
    st = data["stable"]
    both = np.mean(st.any(axis=1) & ~st.all(axis=1))
    print(
        f"wrote {args.out}: {args.n} conditions x {args.k} completions ({args.split}), "
        f"stable {st.mean():.3f}, conditions with both labels {both:.3f}"
    )
    if args.png:
        m = min(3, args.n)
        occ = toy.unpack_occ(data["occ_bits"][:m]).reshape((-1,) + (toy.RES,) * 3)
        caps = [f"cond {i} ({toy.KINDS[data['kind'][i]]}) completion {j}" for i in range(m) for j in range(args.k)]
        toy_render.save_objects(os.path.splitext(args.out)[0] + ".png", occ, caps, st[:m].reshape(-1), ncols=args.k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
