"""Matching a checkpoint's state-dict keys to a model's: wrapper prefixes, a common prefix, tied weights.

Checkpoints name the same tensor differently from the model that reads them:

* wrappers add prefixes: DistributedDataParallel/DataParallel ``module.``, ``torch.compile`` ``_orig_mod.``;
  these are removed first (``module.`` at the front, ``_orig_mod.`` anywhere);
* a LightningModule stores its network under its attribute name (``model.``, ``net.``), while the spec may
  build the bare network; or a task model (``bert.`` + head) may read a base model's weights. So one common
  prefix may be stripped from the checkpoint's keys (keys outside it belong to other parts of the saved
  module and are ignored) or added to them, whichever matches the most keys; no change wins a tie;
* tied weights (an embedding shared with an output layer) appear once in a ``save_pretrained`` file but
  under every name in ``model.state_dict()``: a model key missing from the checkpoint is fine when a key
  holding the same tensor is present.

Anything still missing or unexpected, or a shape that differs, is refused with one line that lists them.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
>>> shapes = {"model._orig_mod.0.weight": (3, 2), "model._orig_mod.0.bias": (3,),
...           "model._orig_mod.1.weight": (1, 3), "model._orig_mod.1.bias": (1,), "loss.pos_weight": (1,)}
>>> m = match_state_dict(shapes, net)
>>> m.strip, m.mapping["0.weight"], m.ignored
('model.', 'model._orig_mod.0.weight', ['loss.pos_weight'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigurationError

__all__ = ["KeyMatch", "match_state_dict", "normalize_key", "WRAPPER_PREFIXES", "shown"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Prefixes of up to this many dotted components are tried (``model.backbone.`` is two).
_PREFIX_DEPTH = 3
# Names listed in a mismatch message before "... and N more".
SHOW = 5


@dataclass
class KeyMatch:
    """How checkpoint keys map onto the model: ``mapping[model_key] = checkpoint_key``."""

    mapping: dict[str, str]
    strip: str = ""
    add: str = ""
    ignored: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A short phrase for messages: which prefix was stripped or added, how many keys were ignored."""
        parts = []
        if self.strip:
            parts.append(f"prefix {self.strip!r} stripped")
        if self.add:
            parts.append(f"prefix {self.add!r} added")
        if self.ignored:
            parts.append(f"{len(self.ignored)} key(s) outside it ignored")
        if self.tied:
            parts.append(f"{len(self.tied)} tied key(s) shared")
        return ", ".join(parts)


def shown(names: Sequence[str], limit: int = SHOW) -> str:
    """``a, b, c`` or ``a, b, c, ... and 7 more``: long key lists stay one readable line."""
    names = list(names)
    head = ", ".join(names[:limit])
    return head + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def normalize_key(key: str) -> str:
    """``key`` without wrapper prefixes: leading ``module.`` (repeated) and every ``_orig_mod.`` component."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _prefixes(keys: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for k in keys:
        parts = k.split(".")
        for depth in range(1, min(_PREFIX_DEPTH, len(parts) - 1) + 1):
            out.add(".".join(parts[:depth]) + ".")
    return out


def _tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """Model key -> every key holding the very same tensor (itself included)."""
    by_id: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for k, v in state.items():
        by_id.setdefault(id(v), []).append(k)
    return {k: by_id[id(v)] for k, v in state.items()}


def match_state_dict(
    shapes: Mapping[str, tuple[int, ...] | None], model: nn.Module, *, source: str = "the checkpoint"
) -> KeyMatch:
    """Map the checkpoint keys in ``shapes`` (key -> tensor shape, ``None`` for a non-tensor entry) onto ``model``.

    Raises :class:`ConfigurationError` naming the missing and unexpected keys (a few of each, then a count),
    the shapes that differ, or two prefixes that fit equally well.
    """
    model_shapes = {k: tuple(v.shape) if hasattr(v, "shape") else None for k, v in model.state_dict().items()}
    model_keys = set(model_shapes)
    normalized: dict[str, str] = {}
    for k in shapes:
        normalized.setdefault(normalize_key(k), k)

    def selected(strip: str, add: str) -> dict[str, str]:
        return {add + n[len(strip):]: k for n, k in normalized.items() if n.startswith(strip)}

    def score(strip: str, add: str) -> int:
        return len(model_keys.intersection(selected(strip, add)))

    best = ("", "")
    best_score = score("", "")
    if best_score < len(model_keys):
        candidates = [(s, "") for s in sorted(_prefixes(list(normalized)))]
        candidates += [("", a) for a in sorted(_prefixes(list(model_keys)))]
        scored = [(score(s, a), s, a) for s, a in candidates]
        top = max((sc for sc, _, _ in scored), default=0)
        if top > best_score:
            winners = [(s, a) for sc, s, a in scored if sc == top]
            # A longer prefix of the same winner also fits ("model." and "model.net." when all sit under
            # "model.net."); keep the shortest of nested winners, refuse unrelated ones.
            winners.sort(key=lambda w: len(w[0]) + len(w[1]))
            s0, a0 = winners[0]
            rivals = [w for w in winners[1:] if not (w[0].startswith(s0) and w[1].startswith(a0))]
            if rivals:
                names = [repr(s or a) for s, a in [winners[0], *rivals]]
                raise ConfigurationError(
                    f"{source} fits the spec's model equally well under prefixes {shown(names)}; the checkpoint "
                    "holds several copies of this architecture: build the model whose weights you mean in the spec"
                )
            best, best_score = (s0, a0), top

    strip, add = best
    mapping = selected(strip, add)
    ignored = [k for n, k in normalized.items() if not n.startswith(strip)]
    groups = _tie_groups(model)
    unexpected = sorted(k for k in mapping if k not in model_keys)
    missing, tied = [], []
    for k in sorted(model_keys - set(mapping)):
        (tied if any(t in mapping for t in groups[k]) else missing).append(k)
    where = f" (after {'stripping' if strip else 'adding'} prefix {strip or add!r})" if (strip or add) else ""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {shown(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {shown([mapping[k] for k in unexpected])}")
        raise ConfigurationError(
            f"{source} does not fit the spec's model {type(model).__name__}{where}: {'; '.join(parts)}. "
            "Build the architecture the checkpoint was saved from in the spec"
        )
    wrong = [
        f"{k} {tuple(shapes[mapping[k]])} vs {model_shapes[k]}"
        for k in sorted(mapping)
        if shapes[mapping[k]] is not None and model_shapes[k] is not None and tuple(shapes[mapping[k]]) != model_shapes[k]
    ]
    if wrong:
        raise ConfigurationError(
            f"{source} has {len(wrong)} tensor(s) whose shape differs from the spec's model (checkpoint vs model): "
            f"{shown(wrong, 3)}. Build the model with the sizes it was trained with"
        )
    return KeyMatch(mapping={k: mapping[k] for k in sorted(mapping)}, strip=strip, add=add, ignored=ignored, tied=tied)
