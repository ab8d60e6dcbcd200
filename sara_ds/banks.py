"""Banks: projected matrices of one shape stepped as one.

A bank stacks the state of k matrices that share a param group, shape, basis side,
rank and base-step count on a leading dim ([k, d, r] bases, [k, r, n] moments,
[k] Fira norms). Each matrix's own state entries become views of those stacks, so:

  * ``state_dict()`` is what it was, plain per-matrix tensors (they share storage,
    which ``torch.save`` writes once), and checkpoints from before banks load as they are;
  * a refresh, which stays per matrix and writes the basis and moments in place,
    writes the bank;
  * a refresh that replaces a tensor instead (moments reset) is noticed by identity
    and the bank is restacked once.

The ordinary step then calls the same pure functions once per bank (``projector`` and
``updates`` read only the last two dims), so the dispatched ops grow with the number
of banks, not of matrices, and the arithmetic per matrix is the one-matrix bank's. A
matrix stepped on its own is a bank of one, whose stacks are views of its own tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Bank:
    def __init__(self, states: list[dict]):
        self.states = list(states)
        names = [name for name, value in states[0].items() if isinstance(value, Tensor)]
        if len(states) == 1:  # a bank of one: views of the matrix's own tensors, nothing copied
            self.stacked = {name: states[0][name].unsqueeze(0) for name in names}
            self._views = {name: (states[0][name],) for name in names}
        else:
            self.stacked = {name: torch.stack([st[name] for st in states]) for name in names}
            self._views = {name: stack.unbind(0) for name, stack in self.stacked.items()}
        for i, st in enumerate(states):
            for name, views in self._views.items():
                st[name] = views[i]
        # what the base reads besides tensors (Adam-mini's block axis), the same for every member
        self.state = dict(states[0], **self.stacked)

    def holds(self, states: list[dict]) -> bool:
        """Every member's tensors are still this bank's views (nothing was replaced since stacking)."""
        return (len(states) == len(self.states) and all(a is b for a, b in zip(states, self.states))
                and all(st[name] is views[i] for name, views in self._views.items() for i, st in enumerate(states)))


def stackable(states: list[dict]) -> bool:
    """Members hold the same tensor entries with the same shapes and dtypes (a bank key guarantees it
    for SARA's own state; this guards against anything else a user put into the state)."""
    def layout(st):
        return {name: (v.shape, v.dtype, v.device) for name, v in st.items() if isinstance(v, Tensor)}
    first = layout(states[0])
    return all(layout(st) == first for st in states[1:])


class Banks:
    """The banks of one optimizer, found again each step by their members' state dicts."""

    def __init__(self):
        self._by_members: dict[tuple, Bank] = {}

    def clear(self) -> None:
        self._by_members.clear()

    def __len__(self) -> int:
        return len(self._by_members)

    def __iter__(self):
        return iter(self._by_members.values())

    def sizes(self) -> list[int]:
        """Each bank's number of matrices (a matrix stepped on its own is a bank of one)."""
        return sorted(len(bank.states) for bank in self._by_members.values())

    def bank_for(self, states: list[dict]) -> Bank:
        key = tuple(id(st) for st in states)
        bank = self._by_members.get(key)
        if bank is None or not bank.holds(states):
            members = set(key)  # a matrix belongs to one bank: drop any other holding these members
            for other in [k for k in self._by_members if members.intersection(k)]:
                del self._by_members[other]
            bank = self._by_members[key] = Bank(states)
        return bank


def plan(projected: list, state, together) -> list:
    """(group, slots) per bank of this step's projected matrices: those ``together(group, slot)`` allows that share
    a group, shape, dtypes, device, side, rank, base-step count and shard context are one bank; every other matrix
    is a bank of one, as is every member of a would-be bank whose state does not stack (``stackable``)."""
    by_key: dict = {}
    for group, slot in projected:
        st = state[slot.index]
        key = (id(group), tuple(slot.grad.shape), slot.grad.dtype, slot.grad.device, slot.target.dtype, st["left"],
               st["rank"], st["base_step"], slot.context.bank_key, None if together(group, slot) else slot.index)
        by_key.setdefault(key, (group, []))[1].append(slot)
    out = []
    for group, slots in by_key.values():
        if len(slots) > 1 and not stackable([state[s.index] for s in slots]):
            out += [(group, [s]) for s in slots]
        else:
            out.append((group, slots))
    return out
