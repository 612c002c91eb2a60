"""Running linear fit of draft acceptance rate against policy entropy, with a subsample of points to plot."""

import json
import math
import os
from typing import Any

import torch


# Weighted sums kept by the fit, in this order.
_SUMS = ("w", "wx", "wy", "wxx", "wyy", "wxy")
_POINT_FIELDS = ("entropy", "acceptance", "weight", "step")
# A variance below this fraction of the mean square is rounding noise of the running sums, not spread.
_RELATIVE_VARIANCE_FLOOR = 1e-12


class AcceptanceEntropyFit:
    """Weighted least-squares fit ``acceptance = slope * entropy + intercept`` accumulated over a run.

    Each point is one completion: the policy's mean entropy over its tokens (x), its draft acceptance rate (y)
    and a weight, typically its number of drafted tokens. The fit is exact over every point ever seen, from
    running float64 sums, while at most ``max_points`` of the points are kept for plotting, as a uniform random
    subsample (reservoir sampling) driven by a seeded generator, so that it is reproducible.

    Args:
        max_points: Most points kept for the plot.
        seed: Seed of the generator that chooses the kept points.
    """

    def __init__(self, max_points: int = 20000, seed: int = 0):
        if max_points < 1:
            raise ValueError(f"max_points must be at least 1, got {max_points}.")
        self.max_points = max_points
        self._generator = torch.Generator().manual_seed(seed)
        self._sums = [0.0] * len(_SUMS)
        self._num_points = 0
        self._points: dict[str, list] = {field: [] for field in _POINT_FIELDS}

    def update(
        self,
        entropy: torch.Tensor,
        acceptance: torch.Tensor,
        weight: torch.Tensor | None = None,
        step: int = 0,
    ) -> None:
        """Adds one round of points.

        Points whose entropy, acceptance or weight is not finite (a completion that never drafted has a NaN
        acceptance rate), or whose weight is not positive, are skipped.

        Args:
            entropy: Mean policy entropy of each completion, in nats, shape ``(n,)``.
            acceptance: Draft acceptance rate of each completion, shape ``(n,)``.
            weight: Weight of each completion, shape ``(n,)``; all ones if None.
            step: Training step the points come from, kept with them for the plot.

        Raises:
            ValueError: If the tensors are not 1-D or their lengths differ.
        """
        tensors = {"entropy": entropy, "acceptance": acceptance}
        if weight is not None:
            tensors["weight"] = weight
        for name, tensor in tensors.items():
            if tensor.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(tensor.shape)}.")
            if len(tensor) != len(entropy):
                raise ValueError(f"{name} has {len(tensor)} values but entropy has {len(entropy)}.")
        x = entropy.detach().to("cpu", torch.float64)
        y = acceptance.detach().to("cpu", torch.float64)
        w = torch.ones_like(x) if weight is None else weight.detach().to("cpu", torch.float64)
        keep = x.isfinite() & y.isfinite() & w.isfinite() & (w > 0)
        x, y, w = x[keep], y[keep], w[keep]
        batch_sums = torch.stack(
            [w.sum(), (w * x).sum(), (w * y).sum(), (w * x * x).sum(), (w * y * y).sum(), (w * x * y).sum()]
        )
        self._sums = [total + value for total, value in zip(self._sums, batch_sums.tolist(), strict=True)]
        self._sample(x.tolist(), y.tolist(), w.tolist(), int(step))
        self._num_points += len(x)

    def _sample(self, entropy: list[float], acceptance: list[float], weight: list[float], step: int) -> None:
        """Reservoir sampling: after ``t`` points in all, each of them is kept with probability ``max_points / t``."""
        rows = [(x, y, w, step) for x, y, w in zip(entropy, acceptance, weight, strict=True)]
        free = min(len(rows), self.max_points - len(self._points["step"]))
        for row in rows[:free]:
            for field, value in zip(_POINT_FIELDS, row, strict=True):
                self._points[field].append(value)
        rest = rows[free:]
        if not rest:
            return
        # The i-th point overall (1-based) replaces a uniformly chosen slot of [0, i) if that slot is a kept one.
        seen = torch.arange(self._num_points + free + 1, self._num_points + len(rows) + 1, dtype=torch.float64)
        slots = (torch.rand(len(rest), generator=self._generator, dtype=torch.float64) * seen).long().tolist()
        for slot, row in zip(slots, rest, strict=True):
            if slot < self.max_points:
                for field, value in zip(_POINT_FIELDS, row, strict=True):
                    self._points[field][slot] = value

    def result(self) -> dict[str, float] | None:
        """The weighted least-squares fit over every point seen so far.

        Returns:
            ``slope``, ``intercept``, Pearson ``r`` (weighted; 0.0 if the acceptance rates do not vary),
            ``num_points``, ``total_weight``, ``mean_entropy`` and ``mean_acceptance``; None if fewer than
            2 points were seen or the entropies do not vary, as the line is then undefined.
        """
        total, wx, wy, wxx, wyy, wxy = self._sums
        if self._num_points < 2:
            return None
        mean_x, mean_y = wx / total, wy / total
        var_x = wxx / total - mean_x**2
        var_y = wyy / total - mean_y**2
        cov = wxy / total - mean_x * mean_y
        if var_x <= _RELATIVE_VARIANCE_FLOOR * wxx / total:
            return None
        slope = cov / var_x
        if var_y <= _RELATIVE_VARIANCE_FLOOR * wyy / total:
            r = 0.0
        else:
            r = max(-1.0, min(1.0, cov / math.sqrt(var_x * var_y)))
        return {
            "slope": slope,
            "intercept": mean_y - slope * mean_x,
            "r": r,
            "num_points": self._num_points,
            "total_weight": total,
            "mean_entropy": mean_x,
            "mean_acceptance": mean_y,
        }

    def state_dict(self) -> dict[str, Any]:
        """The full state as plain JSON-serialisable Python values."""
        return {
            "max_points": self.max_points,
            "sums": dict(zip(_SUMS, self._sums, strict=True)),
            "num_points": self._num_points,
            "points": {field: list(values) for field, values in self._points.items()},
            "generator_state": self._generator.get_state().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state returned by :meth:`state_dict`, so that the fit and the subsampling continue as before.

        Args:
            state: A dict returned by :meth:`state_dict`, possibly after a JSON round trip.
        """
        self.max_points = int(state["max_points"])
        self._sums = [float(state["sums"][name]) for name in _SUMS]
        self._num_points = int(state["num_points"])
        self._points = {field: list(state["points"][field]) for field in _POINT_FIELDS}
        self._generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))

    def metrics(self, prefix: str = "acceptance_entropy/") -> dict[str, float]:
        """The fit's slope, intercept and r as log metrics named with `prefix` (none while the fit is undefined)."""
        result = self.result()
        return {} if result is None else {f"{prefix}{name}": result[name] for name in ("slope", "intercept", "r")}

    def save(self, folder: str | os.PathLike, name: str, plot: bool = True, title: str | None = None) -> None:
        """Writes `folder/name.json` and, with `plot`, `folder/name.png` (see `save_json` and `save_plot`)."""
        os.makedirs(folder, exist_ok=True)
        self.save_json(os.path.join(folder, f"{name}.json"))
        if plot:
            self.save_plot(os.path.join(folder, f"{name}.png"), title=title)

    def save_json(self, path: str | os.PathLike) -> None:
        """Writes the fit (null if undefined) and the kept points as JSON.

        Args:
            path: File to write.
        """
        with open(path, "w") as f:
            json.dump({"fit": self.result(), "points": self._points}, f, indent=2)

    def save_plot(self, path: str | os.PathLike, title: str | None = None) -> bool:
        """Plots the kept points, coloured by step, with the fitted line, and saves the figure as a PNG.

        Args:
            path: File to write.
            title: Title of the plot, if any.

        Returns:
            Whether a plot was written; False if there are no points.
        """
        if not self._points["step"]:
            return False
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(7, 5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        entropy, acceptance = self._points["entropy"], self._points["acceptance"]
        alpha = min(0.8, max(0.05, 20 / math.sqrt(len(entropy))))
        scatter = axes.scatter(
            entropy, acceptance, c=self._points["step"], s=8, alpha=alpha, cmap="viridis", linewidths=0
        )
        figure.colorbar(scatter, ax=axes, label="step")
        fit = self.result()
        if fit is not None:
            xs = [min(entropy), max(entropy)]
            axes.plot(
                xs,
                [fit["slope"] * x + fit["intercept"] for x in xs],
                color="crimson",
                label=f"slope {fit['slope']:.3f}, intercept {fit['intercept']:.3f}, r {fit['r']:.3f} "
                f"(n = {fit['num_points']})",
            )
            axes.legend(loc="best")
        axes.set_xlabel("policy entropy (nats)")
        axes.set_ylabel("draft acceptance rate")
        axes.set_ylim(0, 1)
        if title is not None:
            axes.set_title(title)
        figure.savefig(path, format="png", dpi=120)
        return True
