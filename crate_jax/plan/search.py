"""The search over remat policies and micro-batch sizes, bounded by a number of compiles."""

from __future__ import annotations

import dataclasses

from crate_jax.plan.devices import REMAT_ORDER, data_parallel
from crate_jax.plan.step import Result, compile_step, config_remat, with_settings

# --- the search ------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What the search found: every compile, the best verified setting, and a prediction."""
    results: list[Result]
    best: Result | None  # the fastest setting with the config's global batch that fits
    largest: Result | None = None  # the largest per-device batch compiled that fits
    predicted: dict | None = None  # from a straight line through two compiles at one remat


def _line(a: Result, b: Result) -> tuple[float, float] | None:
    """peak = fixed + slope × (micro-batch per device), through two compiles at one remat."""
    if a.remat != b.remat or a.micro_batch == b.micro_batch:
        return None
    slope = (b.peak_bytes - a.peak_bytes) / (b.micro_batch - a.micro_batch)
    if slope <= 0:
        return None
    return a.peak_bytes - slope * a.micro_batch, slope


def _faster(a: Result | None, b: Result | None) -> Result | None:
    """The better of two fitting settings: lighter remat first, then fewer micro-batches,
    then the larger batch."""
    fitting = [r for r in (a, b) if r is not None and r.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda r: (REMAT_ORDER.index(r.remat), r.grad_accum_steps,
                                       -r.batch_size))


@dataclasses.dataclass
class _Trials:
    """The compiles of one search, at most `max_compiles`, none repeated."""

    config: object
    mesh_shape: dict[str, int]
    usable: int
    max_compiles: int
    report: object
    devices: object
    results: list = dataclasses.field(default_factory=list)

    def __call__(self, batch_size: int, accum: int, remat: str) -> Result | None:
        dp = data_parallel(self.mesh_shape)
        if len(self.results) >= self.max_compiles or batch_size % (dp * accum):
            return None
        for r in self.results:
            if (r.batch_size, r.grad_accum_steps, r.remat) == (batch_size, accum, remat):
                return r
        r = compile_step(with_settings(self.config, batch_size=batch_size, accum=accum,
                                       remat=remat), self.mesh_shape, self.devices)
        r.fits = r.peak_bytes <= self.usable and not r.note
        self.results.append(r)
        self.report(r)
        return r


def _search_remat(trial: _Trials, current: Result, best: Result | None):
    """Step 1: heavier policies until one fits, or one lighter when it fits already."""
    batch, accum = current.batch_size, current.grad_accum_steps
    index = REMAT_ORDER.index(current.remat)
    if not current.fits:
        for heavier in REMAT_ORDER[index + 1:]:
            r = trial(batch, accum, heavier)
            if r is None:
                break
            current, best = r, _faster(r, best)
            if r.fits:
                break
    elif index > 0:
        r = trial(batch, accum, REMAT_ORDER[index - 1])
        if r is not None and r.fits:
            current, best = r, _faster(r, best)
    return current, best


def _second_size(trial: _Trials, current: Result, best: Result | None, per_device: int):
    batch, accum, remat = current.batch_size, current.grad_accum_steps, current.remat
    if best is None:  # halve the micro-batch
        return trial(batch, accum * 2, remat) if per_device // accum >= 2 else None
    if accum > 1:  # the same global batch in fewer, larger micro-batches
        return trial(batch, accum // 2, remat)
    return trial(batch * 2, 1, remat)  # a larger per-device batch: reported, not prescribed


def _predict(trial: _Trials, current: Result, second: Result, best: Result | None,
             per_device: int):
    """Step 2's straight line through two peaks: (prediction, best after checking it)."""
    line = _line(current, second)
    if line is None:
        return None, best
    batch, accum, remat = current.batch_size, current.grad_accum_steps, current.remat
    fixed, slope = line
    micro = int((trial.usable - fixed) // slope)
    predicted = {"remat": remat, "fixed_bytes": fixed, "bytes_per_example": slope,
                 "largest_micro_batch": max(micro, 0)}
    if micro >= 1 and best is None:
        k = accum  # the fewest micro-batches (a power of two) whose size fits
        while per_device // k > micro and per_device // k > 1:
            k *= 2
        predicted["grad_accum_steps"] = k
        check = trial(batch, k, remat)
        if check is not None and not check.fits and per_device // k > 1:
            check = trial(batch, k * 2, remat)
        best = _faster(check, best)
    return predicted, best


def search(config, mesh_shape, usable: int, max_compiles: int, report,
           devices=None, remat_search: bool = True) -> Plan:
    """Compile the config as given, then spend the remaining compiles (see the module doc):

    1. remat (when `remat_search`): when it does not fit, the next heavier policies (none →
       dots → full) at the same batch; when it fits, the next lighter one if that fits too.
    2. batch, at the remat from 1: a second micro-batch size per device — half (twice the
       grad_accum_steps) when nothing fits yet, double when it fits — then a straight line
       through the two peaks predicts the largest micro-batch that fits; a compile left over
       checks the prediction.
    `report(result)` is called after every compile."""
    trial = _Trials(config, mesh_shape, usable, max_compiles, report, devices)
    batch = config.batch_size
    current = trial(batch, config.get("grad_accum_steps", 1), config_remat(config))
    best = _faster(current, None)
    if remat_search:
        current, best = _search_remat(trial, current, best)
    per_device = batch // data_parallel(mesh_shape)
    second = _second_size(trial, current, best, per_device)
    if second is not None and second.batch_size == batch:
        best = _faster(second, best)
    predicted = None
    if second is not None:
        predicted, best = _predict(trial, current, second, best, per_device)
    fitting = [r for r in trial.results if r.fits]
    largest = max(fitting, key=lambda r: r.micro_batch) if fitting else None
    return Plan(trial.results, best, largest, predicted)
