"""One module at a time of a model that accelerate dispatched over devices (``device_map`` with GPU,
CPU and disk placement): the view the block-by-block pruning driver needs for models larger than
its GPU (Section 3.3 at 30B-70B scale).

accelerate keeps an *offloaded* module's tensors on the ``meta`` device and loads them from a
weights map (a dict of CPU tensors, or files in an offload folder) in a pre-forward hook, dropping
them again after the forward. Changing a loaded weight in place therefore changes a temporary copy
that the next forward throws away. :func:`materialized` gives the driver a plain module instead:
every tensor of the module on one device, accelerate's hooks paused, and on exit the changed
parameters written back *where they live* (the CPU dict, or a file in the offload folder that the
weights map then points to; never the original checkpoint) before the module returns to its
placement.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_META = torch.device("meta")


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks attached to ``module`` (a SequentialHook unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def _offload_hook(module: nn.Module) -> Any | None:
    """The hook that offloads this module's tensors, if any."""
    for hook in _hooks(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
            return hook
    return None


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` with a device map (hooks attached)."""
    return hasattr(model, "hf_device_map") or any(hasattr(m, "_hf_hook") for m in model.modules())


def is_offloaded(module: nn.Module) -> bool:
    """Whether any tensor of ``module`` lives in an offload store (CPU offload or disk) rather than
    on a device: such a module's weights are ``meta`` tensors outside a forward pass."""
    return any(_offload_hook(m) is not None for m in module.modules()) or any(
        p.device == _META for p in module.parameters()
    )


def input_device(model: nn.Module) -> torch.device:
    """Where to put a batch of token ids for ``model``: the device of its first real parameter
    (a dispatched model's hooks move inputs on from there), the CPU when everything is offloaded."""
    for p in model.parameters():
        if p.device != _META:
            return p.device
    return torch.device("cpu")


def processing_device(module: nn.Module, default: torch.device | str) -> torch.device:
    """Where the driver works on ``module``: the GPU it already sits on when a device map placed
    all its resident tensors on one GPU (no copy to another GPU), else ``default``."""
    devices = {p.device for p in module.parameters() if p.device != _META}
    if len(devices) == 1 and not is_offloaded(module):
        (only,) = devices
        if only.type == "cuda":
            return only
    return torch.device(default)


@dataclass
class _Slot:
    """One tensor of a module: its owner and attribute, and (when offloaded) the weights map
    and key it is loaded from."""

    owner: nn.Module
    attr: str
    store: Mapping | None
    key: str
    home: torch.device
    is_param: bool


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _slots(module: nn.Module) -> list[_Slot]:
    from accelerate.utils import named_module_tensors

    slots: list[_Slot] = []
    seen: set[tuple[int, str]] = set()
    for sub in module.modules():
        hook = _offload_hook(sub)
        if hook is None:
            continue
        for name, tensor in named_module_tensors(
            sub, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
        ):
            owner, attr = _owner(sub, name)
            if (id(owner), attr) in seen:
                continue
            seen.add((id(owner), attr))
            is_param = attr in owner._parameters
            slots.append(_Slot(owner, attr, hook.weights_map, name, tensor.device, is_param))
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        owner, attr = _owner(module, name)
        if (id(owner), attr) in seen:
            continue
        seen.add((id(owner), attr))
        if tensor.device == _META:
            raise ValueError(
                f"tensor {name!r} of {type(module).__name__} is on the meta device and no accelerate hook says where "
                "its values are stored: the device_map left it on no device"
            )
        slots.append(_Slot(owner, attr, None, name, tensor.device, attr in owner._parameters))
    return slots


def _assign(slot: _Slot, value: torch.Tensor) -> None:
    """Put ``value`` into the owner, keeping a resident Parameter object (as ``Module.to`` does)."""
    if slot.is_param:
        param = slot.owner._parameters[slot.attr]
        if param.device != _META and value.device != _META:
            param.data = value
        else:
            slot.owner._parameters[slot.attr] = nn.Parameter(value, requires_grad=param.requires_grad)
    else:
        slot.owner._buffers[slot.attr] = value


def write_offloaded(store: Mapping, key: str, value: torch.Tensor) -> None:
    """Store ``value`` as the offloaded tensor ``key`` of an accelerate weights map.

    CPU offload (a dict, or the ``state_dict`` of an ``OffloadedWeightsLoader``): the dict entry is
    replaced. Disk offload: the tensor is written to ``<offload folder>/<full key>.safetensors`` and
    the loader's index points there (its previous entry may point into the original checkpoint,
    which is never written to); ``index.json`` in the folder is updated too.
    """
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
    from safetensors.torch import save_file

    full = key
    while isinstance(store, PrefixedDataset):
        full = store.prefix + full
        store = store.dataset
    value = value.detach().to("cpu").contiguous()
    if isinstance(store, OffloadedWeightsLoader):
        if full in store.state_dict:
            store.state_dict[full] = value
            return
        if store.save_folder is None:
            raise ValueError(
                f"cannot write the changed weight {full!r} back: it is offloaded to disk without an offload folder "
                "(load the model with offload_folder=DIR / --offload-folder DIR)"
            )
        path = os.path.join(store.save_folder, f"{full}.safetensors")
        tmp = f"{path}.tmp"
        save_file({full: value}, tmp)
        os.replace(tmp, path)
        old = store.index.get(full, {})
        if old.get("safetensors_file") is None:  # accelerate's own .dat copy is superseded: free its space
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(store.save_folder, f"{full}.dat"))
        store.index[full] = {"safetensors_file": path, "weight_name": full, "dtype": str(value.dtype).split(".")[1]}
        _save_index(store.save_folder, full, store.index[full])
        return
    if isinstance(store, dict):
        store[full] = value
        return
    raise TypeError(f"cannot write back into an offload store of type {type(store).__name__} (key {full!r})")


def _save_index(folder: str, key: str, entry: dict) -> None:
    import json

    path = os.path.join(folder, "index.json")
    index = {}
    if os.path.exists(path):
        with open(path) as f:
            index = json.load(f)
    index[key] = entry
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def paused_hooks(module: nn.Module, recurse: bool = True) -> Iterator[None]:
    """Run ``module`` (and with ``recurse`` its submodules) without accelerate's hooks: no input
    moves, no weight loading or dropping. accelerate's wrapped forward looks the hook up on every
    call, so a no-op hook in its place pauses it."""
    from accelerate.hooks import ModelHook

    modules = list(module.modules()) if recurse else [module]
    saved = [(m, m._hf_hook) for m in modules if hasattr(m, "_hf_hook")]
    for m, _ in saved:
        m._hf_hook = ModelHook()
    try:
        yield
    finally:
        for m, hook in saved:
            m._hf_hook = hook


@contextlib.contextmanager
def materialized(module: nn.Module, device: torch.device | str, *, write_back: bool = False) -> Iterator[nn.Module]:
    """``module`` with every parameter and buffer on ``device`` and accelerate's hooks paused.

    On exit, with ``write_back``, the parameters of offloaded submodules are written back to their
    offload store (so an in-place change such as pruning persists); every tensor then returns to
    its placement (offloaded ones to ``meta``, resident ones to their device). For a plain module
    (no device map) this is ``module.to(device)`` and back. An exception inside skips the write-back.
    """
    device = torch.device(device)
    slots = _slots(module)
    with paused_hooks(module):
        try:
            for s in slots:
                if s.store is not None:
                    value = s.store[s.key]
                    # a private, writable copy (a CPU store's tensor would otherwise be changed in place)
                    _assign(s, value.to(device, copy=True))
                else:
                    current = getattr(s.owner, s.attr)
                    if current.device != device:
                        _assign(s, current.to(device))
            yield module
            if write_back:
                for s in slots:
                    if s.store is not None and s.is_param:
                        write_offloaded(s.store, s.key, getattr(s.owner, s.attr))
        finally:
            for s in slots:
                current = getattr(s.owner, s.attr)
                if s.store is not None:
                    _assign(s, torch.empty_like(current, device=_META))
                elif current.device != s.home:
                    _assign(s, current.to(s.home))
