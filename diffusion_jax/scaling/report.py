"""The scaling report: a markdown table of runs and fits, and a PNG of iso-FLOP curves and power laws."""

import pathlib

import numpy as np

from diffusion_jax.scaling import fit as fits


def markdown(runs, result: fits.ScalingFit, intervals: dict, extrapolated: dict | None) -> str:
  """`runs`: every run, several learning rates per size and budget included (`result` fits the best of them)."""
  learning_rates = sorted({r["learning_rate"] for r in runs if "learning_rate" in r})
  swept = len(learning_rates) > 1
  groups = fits.by_budget(fits.best_learning_rate(runs))
  sizes = sorted({(r["params"], r["size"]) for r in runs})
  best = {c: min(g, key=lambda r: r["heldout_loss"])["size"] for c, g in groups.items()}
  lines = ["Held-out loss (fixed triples, mean over log-SNR levels); bold = best size for the budget"
           + ("; each at its best learning rate." if swept else "."), "",
           "| size | parameters | " + " | ".join(f"C = {c:.3g}" for c in groups) + " |",
           "|---|---|" + "---|" * len(groups)]
  for params, size in sizes:
    cells = []
    for c, g in groups.items():
      run = next((r for r in g if r["size"] == size), None)
      cell = "" if run is None else (f"{run['heldout_loss']:.4f} ({run['steps']} steps"
                                     + (f", lr {run['learning_rate']:g})" if swept else ")"))
      cells.append(f"**{cell}**" if run is not None and best[c] == size else cell)
    lines.append(f"| {size} | {params / 1e6:.3f}M | " + " | ".join(cells) + " |")
  if swept:
    lines += ["", "Held-out loss per learning rate; bold = the best, which the fits use.", "",
              "| size | budget C | " + " | ".join(f"lr {lr:g}" for lr in learning_rates) + " |",
              "|---|---|" + "---|" * len(learning_rates)]
    chosen = {id(r): r for r in fits.best_learning_rate(runs)}
    for params, size in sizes:
      for c in groups:
        at = {r.get("learning_rate"): r for r in runs if r["size"] == size and float(r["budget"]) == c}
        if at:
          cells = ["" if lr not in at else (f"**{at[lr]['heldout_loss']:.4f}**" if id(at[lr]) in chosen
                                             else f"{at[lr]['heldout_loss']:.4f}") for lr in learning_rates]
          lines.append(f"| {size} | {c:.3g} | " + " | ".join(cells) + " |")
    edge = [f"{r['size']} at C = {float(r['budget']):.3g}" for r in chosen.values()
            if r.get("learning_rate") in (learning_rates[0], learning_rates[-1])]
    if edge:
      lines += ["", "Best at the smallest or largest learning rate tried (the optimum may lie outside the range; "
                "widen sweep.learning_rates): " + ", ".join(edge) + "."]
  lines += ["", "| budget C (FLOPs) | N_opt | D_opt (examples) | L_opt | vertex inside the grid |",
            "|---|---|---|---|---|"]
  for isoflop, d_opt in zip(result.isoflops, result.d_opt):
    lines.append(f"| {isoflop.budget:.3g} | {isoflop.n_opt / 1e6:.3f}M | {d_opt:.3g} | {isoflop.loss_opt:.4f} | "
                 f"{'yes' if isoflop.interior else 'no (best run)'} |")
  lines += ["", "| fit | exponent | 95% bootstrap interval | R^2 |", "|---|---|---|---|"]
  for name, law, key in (("N_opt ∝ C^a", result.n_opt_law, "n_opt"), ("D_opt ∝ C^b", result.d_opt_law, "d_opt"),
                         ("L_opt ∝ C^c", result.loss_law, "loss"), ("FLOPs/example ∝ N^k", result.flops_law, None)):
    interval = f"[{intervals[key][0]:.3f}, {intervals[key][1]:.3f}]" if key in intervals else ""
    lines.append(f"| {name} | {law.exponent:.3f} | {interval} | {law.r2:.3f} |")
  if extrapolated:
    lines += ["", f"Extrapolation: L_opt fitted on the smaller budgets predicts {extrapolated['predicted']:.4f} at "
              f"C = {extrapolated['budget']:.3g}; observed {extrapolated['observed']:.4f} (relative error "
              f"{extrapolated['relative_error']:+.1%})."]
  return "\n".join(lines) + "\n"


def plot(runs, result: fits.ScalingFit, extrapolated: dict | None, path) -> pathlib.Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  figure, axes = plt.subplots(1, 3, figsize=(14, 4))
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(result.isoflops)))
  for colour, isoflop, group in zip(colours, result.isoflops, fits.by_budget(runs).values()):
    params = np.array([r["params"] for r in group])
    axes[0].plot(params, [r["heldout_loss"] for r in group], "o", color=colour, label=f"C = {isoflop.budget:.2g}")
    grid = np.geomspace(params.min(), params.max(), 50)
    axes[0].plot(grid, np.polyval(isoflop.parabola, np.log(grid)), "-", color=colour, alpha=0.7)
    axes[0].plot(isoflop.n_opt, isoflop.loss_opt, "*", color=colour, markersize=14, markeredgecolor="k")
  axes[0].set(xscale="log", xlabel="parameters N", ylabel="held-out loss", title="iso-FLOP curves")
  axes[0].legend(fontsize=8)
  budgets = np.array([f.budget for f in result.isoflops])
  line = np.geomspace(budgets.min(), budgets.max() * 2, 50)
  axes[1].plot(budgets, [f.n_opt for f in result.isoflops], "o", color="C0", label="N_opt (parameters)")
  axes[1].plot(line, result.n_opt_law(line), "-", color="C0", label=f"∝ C^{result.n_opt_law.exponent:.2f}")
  axes[1].plot(budgets, result.d_opt, "s", color="C1", label="D_opt (examples)")
  axes[1].plot(line, result.d_opt_law(line), "-", color="C1", label=f"∝ C^{result.d_opt_law.exponent:.2f}")
  axes[1].set(xscale="log", yscale="log", xlabel="training FLOPs C", title="compute-optimal size and data")
  axes[1].legend(fontsize=8)
  axes[2].plot(budgets, [f.loss_opt for f in result.isoflops], "o", color="C2", label="L_opt")
  axes[2].plot(line, result.loss_law(line), "-", color="C2", label=f"∝ C^{result.loss_law.exponent:.3f}")
  if extrapolated:
    axes[2].plot(extrapolated["budget"], extrapolated["predicted"], "x", color="C3", markersize=10,
                 label=f"predicted from smaller C ({extrapolated['relative_error']:+.1%})")
  axes[2].set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="held-out loss",
              title="optimal loss vs compute")
  axes[2].legend(fontsize=8)
  for axis in axes:  # decade labels only: minor labels on a log axis overlap
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  figure.tight_layout()
  path = pathlib.Path(path)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


def write(runs, directory, bootstrap_samples: int = 1000) -> tuple[pathlib.Path, pathlib.Path]:
  """scaling.md and scaling.png in `directory`, from the completed runs; of runs that differ only in learning
  rate the fits and the plot use the best."""
  best = fits.best_learning_rate(runs)
  result = fits.fit(best)
  intervals = fits.bootstrap(best, samples=bootstrap_samples)
  extrapolated = fits.extrapolation(best) if len(fits.by_budget(best)) >= 3 else None
  directory = pathlib.Path(directory)
  table = directory / "scaling.md"
  table.write_text(markdown(runs, result, intervals, extrapolated))
  return table, plot(best, result, extrapolated, directory / "scaling.png")
