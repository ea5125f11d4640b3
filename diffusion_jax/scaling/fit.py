"""Fits for scaling experiments: power laws, iso-FLOP parabolas, bootstrap intervals, extrapolation.

A run is a dict with at least `budget` (training FLOPs C), `params` (N), `flops_per_example` and
`heldout_loss` (L). For each budget the loss is fitted as a parabola in log N; its vertex is the
compute-optimal size N_opt(C), and D_opt(C) = C / FLOPs-per-example(N_opt) the examples it sees.
N_opt, D_opt and the optimal loss L_opt are then fitted as power laws in C (Chinchilla approach 2).
Pure numpy; no model or training code.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = coefficient * x ** exponent, fitted by least squares in log-log space."""
  coefficient: float
  exponent: float
  r2: float

  def __call__(self, x):
    return self.coefficient * np.asarray(x, np.float64) ** self.exponent


def power_law(x, y) -> PowerLaw:
  log_x, log_y = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
  if len(log_x) < 2 or np.ptp(log_x) == 0:
    raise ValueError(f"A power-law fit needs at least two distinct x values; got {list(np.exp(log_x))}.")
  exponent, intercept = np.polyfit(log_x, log_y, 1)
  residual = log_y - (intercept + exponent * log_x)
  total = np.sum((log_y - log_y.mean()) ** 2)
  r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else 1.0
  return PowerLaw(float(np.exp(intercept)), float(exponent), float(r2))


@dataclasses.dataclass(frozen=True)
class IsoFlop:
  """One budget's fit: loss = a (log N)^2 + b log N + c."""
  budget: float
  parabola: tuple          # (a, b, c) in natural log N
  n_opt: float
  loss_opt: float
  interior: bool           # the vertex is a minimum inside the sampled sizes (else the best run is used)


def isoflop(budget: float, params, losses) -> IsoFlop:
  params, losses = np.asarray(params, np.float64), np.asarray(losses, np.float64)
  log_n = np.log(params)
  if len(np.unique(log_n)) < 3:
    raise ValueError(f"Budget {budget:.3g} has {len(np.unique(log_n))} distinct model sizes; an iso-FLOP "
                     "parabola needs at least 3.")
  a, b, c = np.polyfit(log_n, losses, 2)
  vertex = -b / (2 * a) if a > 0 else np.nan
  interior = bool(a > 0 and log_n.min() <= vertex <= log_n.max())
  if not interior:  # no minimum inside the grid: report the best sampled run, flagged
    best = int(np.argmin(losses))
    return IsoFlop(float(budget), (float(a), float(b), float(c)), float(params[best]), float(losses[best]), False)
  return IsoFlop(float(budget), (float(a), float(b), float(c)), float(np.exp(vertex)),
                 float(np.polyval((a, b, c), vertex)), True)


@dataclasses.dataclass(frozen=True)
class ScalingFit:
  isoflops: tuple          # one IsoFlop per budget, ascending
  d_opt: tuple             # examples seen at N_opt, per budget
  n_opt_law: PowerLaw      # N_opt(C)
  d_opt_law: PowerLaw      # D_opt(C)
  loss_law: PowerLaw       # L_opt(C)
  flops_law: PowerLaw      # FLOPs per example as a function of N (from the runs' measured FLOPs)


def best_learning_rate(runs) -> list:
  """Of the runs at one size and budget that differ only in learning rate, the one with the lowest held-out
  loss (a sweep without learning rates keeps every run)."""
  best = {}
  for run in runs:
    key = (run["params"], float(run["budget"]))
    if key not in best or run["heldout_loss"] < best[key]["heldout_loss"]:
      best[key] = run
  return list(best.values())


def by_budget(runs) -> dict:
  groups = {}
  for run in runs:
    groups.setdefault(float(run["budget"]), []).append(run)
  return dict(sorted(groups.items()))


def fit(runs) -> ScalingFit:
  groups = by_budget(runs)
  if len(groups) < 2:
    raise ValueError(f"Scaling fits need runs at two or more compute budgets; got {list(groups)}.")
  flops_law = power_law([r["params"] for r in runs], [r["flops_per_example"] for r in runs])
  isoflops = tuple(isoflop(c, [r["params"] for r in g], [r["heldout_loss"] for r in g]) for c, g in groups.items())
  budgets = [f.budget for f in isoflops]
  d_opt = tuple(float(f.budget / flops_law(f.n_opt)) for f in isoflops)
  return ScalingFit(isoflops, d_opt, power_law(budgets, [f.n_opt for f in isoflops]), power_law(budgets, d_opt),
                    power_law(budgets, [f.loss_opt for f in isoflops]), flops_law)


def bootstrap(runs, samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
  """Percentile intervals of the fitted exponents, resampling runs with replacement within each budget
  (resamples with fewer than 3 distinct sizes in some budget are redrawn)."""
  rng = np.random.default_rng(seed)
  groups = list(by_budget(runs).values())
  exponents = {"n_opt": [], "d_opt": [], "loss": []}
  attempts = 0
  while len(exponents["loss"]) < samples and attempts < samples * 20:
    attempts += 1
    resampled = [[g[i] for i in rng.integers(0, len(g), len(g))] for g in groups]
    if any(len({r["params"] for r in g}) < 3 for g in resampled):
      continue
    result = fit([r for g in resampled for r in g])
    exponents["n_opt"].append(result.n_opt_law.exponent)
    exponents["d_opt"].append(result.d_opt_law.exponent)
    exponents["loss"].append(result.loss_law.exponent)
  tail = (1 - level) / 2 * 100
  return {k: tuple(float(p) for p in np.percentile(v, [tail, 100 - tail])) for k, v in exponents.items()}


def extrapolation(runs) -> dict:
  """Hold out the largest budget, fit L_opt(C) on the others, predict the held-out budget's optimal loss."""
  groups = by_budget(runs)
  if len(groups) < 3:
    raise ValueError("The extrapolation check needs at least three budgets (two to fit, one held out).")
  largest = max(groups)
  held_out = isoflop(largest, [r["params"] for r in groups[largest]], [r["heldout_loss"] for r in groups[largest]])
  rest = fit([r for c, g in groups.items() if c != largest for r in g])
  predicted = float(rest.loss_law(largest))
  return {"budget": largest, "predicted": predicted, "observed": held_out.loss_opt,
          "relative_error": (predicted - held_out.loss_opt) / held_out.loss_opt}
