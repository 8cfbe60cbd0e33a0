"""Which metrics a probe measures and with what options, in every form a user writes them, checked up front.

One metric with options can be written as

* a string ``"NAME"`` or ``"NAME:key=value,key=value"`` (the CLI's ``--metric``; ``"rmed:hvps=256"``,
  ``"spectrum:k=3,tol=1e-4"``): values are read as the type of the option in the metric's signature
  (``none`` for None, ``true``/``false`` for booleans, ``a+b`` for a list of block patterns or of numbers);
* a dict ``{"name": "rmed", "hvps": 256}``;
* and a whole selection as a list of those, or a dict of names to options (``{"rmed": {"hvps": 256}}``).

:func:`resolve_metrics` turns any of these into ``{name: {option: value}}`` and checks every option against
the metric's real signature (unknown key, wrong type, out of range, a value outside its choices) before any
model is touched, so a misspelt or impossible option fails once, at the start, naming the metric, the key and
the keys the metric takes, instead of failing every probe of a long run.

>>> resolve_metrics(["spectrum:k=3,tol=1e-4", {"name": "rmed", "hvps": 256}])
{'spectrum': {'k': 3, 'tol': 0.0001}, 'rmed': {'hvps': 256}}
>>> resolve_metrics("trace:method=hutch++")
{'trace': {'method': 'hutch++'}}
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError
from ..metrics import registry

__all__ = ["parse_metric", "resolve_metrics", "metric_option_types", "PROBE_CONTEXT", "METRIC_SPEC_HELP"]

# Options a probe fills in for the metrics that take them (GeometryProbe._run_metric); a user may set them too,
# but only the Python API can pass objects, so the CLI does not offer the object-valued ones.
PROBE_CONTEXT = ("optimizer", "noise_data", "grad_norm0", "seed", "basis_device", "max_basis", "device_vectors", "warm",
                 "last_update")
_OBJECTS = ("optimizer", "noise_data", "warm", "generator", "rmed_options", "u_min_vector")

METRIC_SPEC_HELP = ("NAME or NAME:key=value,... (e.g. rmed:hvps=256, spectrum:k=3,tol=1e-4); "
                    "'geomprobe explain NAME' lists a metric's options")

# Least values (inclusive) of integer options, by name; (metric, name) overrides the name alone.
_LEAST: dict[Any, int] = {
    "k": 1, "hvps": 1, "m": 1, "n_v": 1, "grid_size": 2, "bootstrap": 10, "max_iter": 1, "max_samples": 1,
    "min_samples": 1, "chunk_size": 1, "max_elements": 1, "tail_values": 1, "partitions": 1, "hill_k": 1,
    "n_boot": 10, "vectors": 1, "krylov_steps": 1, "batch": 1, "lanczos_max_iter": 1, "exact_threshold": 0,
    "top": 0, "screen_samples": 2, "signs": 2, "min_k": 3, "dataset_size": 2, "max_basis": 2,
    "device_vectors": 0, "min_n_v": 3,
    ("rmed", "k"): 3, ("diagshare", "k"): 2,
}
# Real options: "pos" > 0, "nonneg" >= 0, "unit" in (0, 1); all finite.
_REAL: dict[str, str] = {
    "tol": "pos", "lanczos_tol": "pos", "z": "pos", "sigma2": "pos", "edge_threshold": "unit", "level": "unit",
    "rel_tol": "nonneg", "rel_g": "nonneg", "rel_h": "nonneg", "eps_g": "nonneg", "eps_h": "nonneg",
    "grad_norm0": "nonneg", "mass_tol": "nonneg",
}
_CHOICES: dict[Any, tuple[Any, ...]] = {
    ("spectrum", "which"): ("both", "largest", "smallest"),
    ("spectrum", "bound"): ("residual", "gap"),
    ("trace", "method"): ("deflated", "hutchinson", "hutch++"),
    ("noise", "method"): ("auto", "vmap", "microbatch"),
    ("isotropy", "method"): ("auto", "vmap", "microbatch"),
    ("isotropy", "u_min"): ("lanczos", None),
}
_RANGE_TEXT = {"pos": "a number > 0", "nonneg": "a number >= 0", "unit": "a number in (0, 1)"}


def _signature(name: str) -> Mapping[str, inspect.Parameter]:
    params = inspect.signature(registry.get(name).fn).parameters
    return {k: p for i, (k, p) in enumerate(params.items())
            if i > 0 and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def _takes_anything(name: str) -> bool:
    params = inspect.signature(registry.get(name).fn).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _types(p: inspect.Parameter) -> set[str]:
    """The type names of an annotation (``"float | None"`` -> {"float", "None"}); from the default if none."""
    ann = p.annotation
    if ann is inspect.Parameter.empty:
        return {type(p.default).__name__} if p.default is not inspect.Parameter.empty else {"Any"}
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    out = set()
    for part in text.split("|"):
        part = part.strip()
        if part.startswith(("Sequence", "list", "tuple")):
            out.add("Sequence")
            elem = part.split("[", 1)[-1]
            if elem.startswith(("float", "int")):
                out.add("Sequence[" + elem[:elem.index("]")] + "]" if "]" in elem else "Sequence[float]")
        else:
            out.add(part.split("[")[0])
    return out


def metric_option_types(name: str) -> dict[str, str]:
    """The options of metric ``name`` a user sets (not filled in by the probe), with their type and default,
    as ``{"tol": "float = 0.001", ...}``. Costs nothing."""
    out = {}
    for key, p in _signature(name).items():
        if key in PROBE_CONTEXT and key != "seed" or key in _OBJECTS:
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        out[key] = f"{ann} = {p.default!r}" if p.default is not inspect.Parameter.empty else str(ann)
    return out


def _allowed(name: str) -> str:
    return ", ".join(metric_option_types(name)) or "(none)"


def _bad(name: str, key: str, value: Any, want: str) -> ConfigurationError:
    return ConfigurationError(f"metric {name!r}: option {key}={value!r} must be {want}; {name} takes {_allowed(name)}")


def _from_text(name: str, key: str, text: str, types: set[str]) -> Any:
    """A CLI value read as the option's type (the first of its annotation's types that reads it)."""
    low = text.strip().lower()
    if types & {"None", "Any"} and low in ("none", "null", ""):
        return None
    if "bool" in types:
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
    if types & {"int", "Any"}:
        try:
            return int(text)
        except ValueError:
            pass
    if types & {"float", "Any"}:
        try:
            return float(text)
        except ValueError:
            pass
    numeric = "Sequence[float]" in types or "Sequence[int]" in types
    if numeric and ("+" in text or not types & {"int", "float"}):
        # numbers, written a+b on the command line (span=-1+1, points=21+21)
        cast = float if "Sequence[float]" in types else int
        try:
            return tuple(cast(t) for t in text.split("+") if t.strip())
        except ValueError:
            raise _bad(name, key, text, "numbers joined by + (e.g. -1+1)") from None
    if "Sequence" in types and "+" in text:
        return [t for t in text.split("+") if t]
    if types & {"str", "Sequence", "Any"} or "device" in " ".join(types):
        return text
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a word"}
    want = " or ".join(words.get(t, t) for t in sorted(types) if t != "None") + (" or none" if "None" in types else "")
    raise _bad(name, key, text, want)


def parse_metric(text: str) -> tuple[str, dict[str, Any]]:
    """``"rmed:hvps=256,k=64"`` -> ``("rmed", {"hvps": 256, "k": 64})``, values read as each option's type and
    checked (:func:`resolve_metrics`). Raises :class:`ConfigurationError` naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError(f"a metric is written NAME or NAME:key=value,...; got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    registry.get(name)  # an unknown name: the known ones
    params = _signature(name)
    options: dict[str, Any] = {}
    for item in (rest.split(",") if rest.strip() else []):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigurationError(
                f"metric {name!r}: {item.strip()!r} is not key=value (write {name}:key=value,key=value); "
                f"{name} takes {_allowed(name)}")
        if key in options:
            raise ConfigurationError(f"metric {name!r}: option {key!r} is given twice")
        if key not in params:
            options[key] = raw  # reported as unknown by the check below, with the allowed keys
            continue
        if key in _OBJECTS:
            raise ConfigurationError(f"metric {name!r}: option {key!r} takes a Python object, which the command "
                                     f"line cannot pass; set it through the Python API")
        options[key] = _from_text(name, key, raw.strip(), _types(params[key]))
    check_options(name, options)
    return name, options


def _check_value(name: str, key: str, value: Any, p: inspect.Parameter) -> None:
    types = _types(p)
    if value is None:
        if "None" in types or "Any" in types or (name, key) in _CHOICES:
            return
        raise _bad(name, key, value, "given (it has no None)")
    choices = _CHOICES.get((name, key))
    if choices is not None and isinstance(value, str):
        if value not in choices:
            raise _bad(name, key, value, "one of " + ", ".join(map(repr, choices)))
        return
    if ("Sequence[float]" in types or "Sequence[int]" in types) and not (
            isinstance(value, numbers.Real) and types & {"int", "float"}):
        def finite(v: Any) -> bool:
            if isinstance(v, Sequence) and not isinstance(v, str):  # per-axis pairs of a plane's span
                return all(finite(x) for x in v)
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if not (isinstance(value, Sequence) and not isinstance(value, str) and finite(value)):
            raise _bad(name, key, value, "a list of finite numbers")
        return
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if types == {"bool"} and not isinstance(value, bool):
        raise _bad(name, key, value, "true or false")
    if "int" in types and "float" not in types and not types & {"Any", "str"}:
        if not is_int:
            raise _bad(name, key, value, "an integer")
        least = _LEAST.get((name, key), _LEAST.get(key))
        if least is not None and value < least:
            raise _bad(name, key, value, f"an integer >= {least}")
        return
    if "float" in types:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _bad(name, key, value, "a number")
        kind = _REAL.get(key)
        ok = math.isfinite(value) and {"pos": value > 0, "nonneg": value >= 0, "unit": 0 < value < 1,
                                        None: True}[kind]
        if not ok:
            raise _bad(name, key, value, _RANGE_TEXT.get(kind, "a finite number"))
        return
    if types <= {"str", "None", "Sequence"} and "Sequence" in types:
        good = isinstance(value, str) or (isinstance(value, Sequence) and all(isinstance(v, str) for v in value))
        if not good:
            raise _bad(name, key, value, "a block name pattern or a list of them")


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` for an option metric ``name`` does not take, or a value of the wrong
    type or out of range (metrics that take ``**kwargs`` accept any key). Costs nothing."""
    if _takes_anything(name):
        return
    params = _signature(name)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigurationError(
            f"metric {name!r} has no option {', '.join(map(repr, unknown))}; it takes {_allowed(name)}")
    for key, value in options.items():
        if key not in _OBJECTS and key not in ("basis_device",):
            _check_value(name, key, value, params[key])


def _one(item: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return parse_metric(item)
    if isinstance(item, Mapping):
        if "name" not in item:
            raise ConfigurationError(f"a metric given as a dict needs its 'name' key, got {dict(item)!r}")
        opts = {str(k): v for k, v in item.items() if k != "name"}
        name = item["name"]
        if not isinstance(name, str):
            raise ConfigurationError(f"a metric's name must be a string, got {name!r}")
        registry.get(name)
        check_options(name, opts)
        return name, opts
    raise ConfigurationError(
        f"a metric is a name, 'NAME:key=value,...' or a dict with 'name', got {type(item).__name__} {item!r}")


def resolve_metrics(metrics: Any) -> dict[str, dict[str, Any]]:
    """Every form of a metric selection (module docstring) as ``{name: options}``, checked; a metric named
    twice is an error (its options would silently override each other). Costs nothing."""
    if isinstance(metrics, str) or (isinstance(metrics, Mapping) and "name" in metrics):
        metrics = [metrics]
    out: dict[str, dict[str, Any]] = {}
    if isinstance(metrics, Mapping):
        for name, opts in metrics.items():
            if opts is not None and not isinstance(opts, Mapping):
                raise ConfigurationError(f"the options of metric {name!r} must be a dict, got {opts!r}")
            out[str(name)] = _one({"name": name, **dict(opts or {})})[1]
    else:
        if not isinstance(metrics, (Sequence, set, frozenset)):
            raise ConfigurationError(f"metrics must be a list of names or a dict, got {type(metrics).__name__}")
        for item in metrics:
            name, opts = _one(item)
            if name in out:
                raise ConfigurationError(f"metric {name!r} is given twice; give it once with all its options")
            out[name] = opts
    if not out:
        raise ConfigurationError(f"no metrics asked for; choose from {', '.join(registry.available())}")
    return out
