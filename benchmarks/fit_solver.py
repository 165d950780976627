"""The value fit's solver at growing size: Cholesky on the normal equations against conjugate gradients.

    python benchmarks/fit_solver.py --out benchmarks/results/fit_solver      # ~10 min on one core

One head, random keys and queries (d = 64, logits scaled 1.2/8 so that attention is neither flat nor one-hot),
targets O random, prior random, lam = 1e-2, fp32, one thread. For each (N queries, m kept entries): seconds and
the fit's relative output residual ‖AV − O‖/‖O‖ for Cholesky, CG to a tolerance, and CG stopped after a fixed
number of iterations. Random heads make the timing valid and the residuals only indicative: real heads at long
n settle which solver the default uses (kvsculpt.core.fit.ridge_values). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvsculpt.core.fit import ridge_values

SIZES = ((8000, 512), (8000, 1024), (8000, 2048), (16000, 2048), (16000, 4096), (24000, 4096), (24000, 7000))
SOLVERS = {"cholesky": {"solver": "cholesky"}, "cg tol 1e-5": {"solver": "cg", "cg_tol": 1e-5, "cg_iters": 1000},
           "cg 20 iterations": {"solver": "cg", "cg_tol": 0.0, "cg_iters": 20}}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/fit_solver")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for N, m in SIZES:
        g = torch.Generator().manual_seed(N + m)
        K, Q = torch.randn(1, m, 64, generator=g), torch.randn(1, N, 64, generator=g) * 1.2
        A = torch.softmax(Q @ K.transpose(1, 2) / 8, -1)
        O, prior = torch.randn(1, N, 64, generator=g), torch.randn(1, m, 64, generator=g)
        for name, kw in SOLVERS.items():
            t = time.perf_counter()
            V = ridge_values(A, O, 1e-2, prior, **kw)
            seconds = time.perf_counter() - t
            rows.append({"N": N, "m": m, "solver": name, "seconds": seconds,
                         "residual": float((A @ V - O).norm() / O.norm())})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1)
    )
    lines = ["# The value fit's solver: Cholesky against conjugate gradients", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "One random head (d = 64), lam = 1e-2, fp32, one thread of the project's CPU. Seconds, and the relative "
             "output residual of the fit (indicative only: random heads).", "",
             "| N | m | " + " | ".join(f"{s} s | residual" for s in SOLVERS) + " |",
             "|---|---|" + "---|---|" * len(SOLVERS)]  # fmt: skip
    for N, m in SIZES:
        cells = {r["solver"]: r for r in rows if (r["N"], r["m"]) == (N, m)}
        lines.append(f"| {N} | {m} | " + " | ".join(f"{cells[s]['seconds']:.2f} | {cells[s]['residual']:.4f}"
                                                    for s in SOLVERS) + " |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
