# Derives the Polar Express coefficients that train_gpt.py's POLAR_EXPRESS holds, and prints them with the band each
# step leaves. Source: Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and Their
# Application to the Muon Algorithm" (2025), sections 3-4 and appendix D: step k applies the odd quintic
# p(x) = a x + b x^3 + c x^5 closest to 1 in the max norm over [l_k, u_k], the interval that holds every singular
# value after the steps before it; it then holds them in [p(l_k), max p] = [1 - E_k, 1 + E_k]. This greedy choice is
# optimal for the composition (the paper's theorem 4.1). Two finite-precision measures from the paper: the fit is
# taken on [max(l, cushion u), u] and then scaled so that the band over the whole [l, u] is centred on 1 (the
# polynomial's coefficients stay smaller for a tiny l); train_gpt.py evaluates p(x / 1.01) in every step but the last,
# so bf16 roundoff that pushes a singular value a little past u is not amplified.
# The minimax fit is the Remez exchange on 4 reference points (3 coefficients + the level E), written here.
import argparse

import numpy as np

LOWER = 1e-3  # the smallest singular value (after Frobenius normalization) the paper designs Muon's steps for
CUSHION = 0.02407327424182761  # the paper's cushion
STEPS = 8


def minimax_odd_quintic(lo: float, hi: float, iters: int = 100) -> tuple[tuple[float, float, float], float]:
    # (a, b, c) minimizing max |1 - p(x)| over [lo, hi], and that max E. Equioscillation: 1 - p = +E, -E, +E, -E at
    # lo, the two interior extrema of p, hi; solve for (a, b, c, E), move the interior points to the new extrema
    # (roots of p'(x) = a + 3b x^2 + 5c x^4, a quadratic in x^2), repeat until they stop moving.
    x = lo + (hi - lo) * (1 - np.cos(np.pi * np.arange(4) / 3)) / 2
    for _ in range(iters):
        system = np.stack([x, x ** 3, x ** 5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, E = np.linalg.solve(system, np.ones(4))
        squares = np.roots([5 * c, 3 * b, a])
        squares = np.sort(squares[np.isreal(squares)].real)
        inner = np.sqrt(squares[(squares > lo * lo) & (squares < hi * hi)])
        if len(inner) != 2:
            raise ArithmeticError(f"Remez on [{lo}, {hi}]: p has {len(inner)} interior extrema, not 2")
        moved = np.abs(inner - x[1:3]).max()
        x[1:3] = inner
        if moved < 1e-15 * hi:
            break
    return (float(a), float(b), float(c)), float(abs(E))


def quintic(coefficients, x):
    a, b, c = coefficients
    return a * x + b * x ** 3 + c * x ** 5


def polar_express(steps: int, lower: float = LOWER, cushion: float = CUSHION) -> list[tuple[float, float, float]]:
    # the greedy sequence from [lower, 1]; once the band is narrower than the Remez system can resolve in float64,
    # the minimax quintic is its limit for an interval shrinking onto 1: p(1) = 1, p'(1) = p''(1) = 0
    lo, hi, out = lower, 1.0, []
    for _ in range(steps):
        if hi - lo < 1e-6:
            p = (15 / 8, -10 / 8, 3 / 8)
        else:
            p, _ = minimax_odd_quintic(max(lo, cushion * hi), hi)
            grid = np.linspace(lo, hi, 100_001)
            values = quintic(p, grid)
            p = tuple(float(v * 2 / (values.min() + values.max())) for v in p)
        values = quintic(p, np.linspace(lo, hi, 100_001))
        lo, hi = values.min(), values.max()
        out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description="Print the Polar Express quintics and the band after each step.")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--lower", type=float, default=LOWER, help="smallest normalized singular value designed for")
    ap.add_argument("--cushion", type=float, default=CUSHION, help="fit on [max(l, cushion u), u] (0 = off)")
    opts = ap.parse_args()
    if opts.steps < 1:
        ap.error(f"argument --steps: {opts.steps} must be at least 1")
    if not 0 < opts.lower < 1:
        ap.error(f"argument --lower: {opts.lower} must be above 0 and below 1 (a normalized singular value)")
    if not 0 <= opts.cushion < 1:
        ap.error(f"argument --cushion: {opts.cushion} must be at least 0 (off) and below 1")
    try:
        table = polar_express(opts.steps, opts.lower, opts.cushion)
    except ArithmeticError as e:  # a cushion near 1 leaves a fit interval too narrow for Remez in float64
        ap.exit(2, f"error: {e}; use a smaller --cushion\n")
    lo, hi = opts.lower, 1.0
    print("POLAR_EXPRESS = [  # bench/polar_express.py")
    for p in table:
        values = quintic(p, np.linspace(lo, hi, 100_001))
        lo, hi = values.min(), values.max()
        print(f"    ({p[0]!r}, {p[1]!r}, {p[2]!r}),  # band [{lo:.6f}, {hi:.6f}]")
    print("]")


if __name__ == "__main__":
    main()
