"""The predictors by name, fitted on a training trace: what the benchmarks compare.

frequency and markov learn from the training part here; the speculator comes
trained from a file (`mer train-speculator`); lookahead needs the store the trace
was recorded from; the ensemble averages the others that learn from routing
(markov, speculator, lookahead when present), never the baseline.
"""

from __future__ import annotations

from pathlib import Path

from mer.errors import ConfigError
from mer.predict.base import Predictor
from mer.predict.ensemble import EnsemblePredictor
from mer.predict.frequency import FrequencyPredictor
from mer.predict.lookahead import LookaheadPredictor
from mer.predict.markov import MarkovPredictor
from mer.predict.speculator import SpeculatorPredictor, load_speculator
from mer.trace.format import Trace

NAMES = ("frequency", "markov", "speculator", "lookahead", "ensemble")


def fitted(
    train: Trace,
    speculator: str | Path | None = None,
    store: str | Path | None = None,
    max_distance: int = 3,
    names=NAMES,
) -> dict[str, Predictor]:
    """Each available predictor of `names`, fitted on `train`: name -> predictor."""
    out: dict[str, Predictor] = {}
    if "frequency" in names:
        out["frequency"] = FrequencyPredictor().fit(train)
    if "markov" in names or "ensemble" in names:
        out["markov"] = MarkovPredictor(max_distance).fit(train)
    if speculator is not None and ("speculator" in names or "ensemble" in names):
        spec = load_speculator(speculator)
        if spec.config.max_distance < max_distance:
            raise ConfigError(f"{speculator}: trained for 1..{spec.config.max_distance} layers "
                              f"ahead, {max_distance} needed")  # fmt: skip
        out["speculator"] = spec
    if store is not None and ("lookahead" in names or "ensemble" in names):
        look = LookaheadPredictor.from_store(store)
        look.check(train, "the training trace")
        out["lookahead"] = look.fit(train)
    if "ensemble" in names:
        members = [out[n] for n in ("markov", "speculator", "lookahead") if n in out]
        if len(members) > 1:
            out["ensemble"] = EnsemblePredictor(members)
    return {n: p for n, p in out.items() if n in names}


def one(name: str, train: Trace, speculator=None, store=None, max_distance: int = 3) -> Predictor:
    """The predictor `name`, fitted; a clear error when what it needs was not given."""
    if name not in NAMES:
        raise ConfigError(f"unknown predictor {name!r} (choose from {', '.join(NAMES)})")
    if name == "speculator" and speculator is None:
        raise ConfigError("the speculator predictor needs --speculator FILE.pt")
    if name == "lookahead" and store is None:
        raise ConfigError("the lookahead predictor needs --store DIR (the traced model)")
    found = fitted(train, speculator, store, max_distance, names=(name,))
    if name not in found:
        raise ConfigError("the ensemble needs --speculator or --store besides markov")
    return found[name]


def training_overlap(spec: SpeculatorPredictor, trace: Trace, held_out: float) -> bool:
    """Whether the speculator saw sequences of `trace` that a split at `held_out` holds out."""
    fingerprint = trace.fingerprint()
    return any(
        t.get("fingerprint") == fingerprint and t.get("held_out") != held_out
        for t in spec.info.get("trained_on", [])
    )
