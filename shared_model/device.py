"""Which torch device a node trains on, checked before anything is loaded.

A member's data center may hold accelerators; the node's own config names the one it uses
(``device="cuda:1"``), never the coordinator. The name is resolved once, when the node
starts, so a typo or a device this machine does not have is one clear line at start-up, not
a CUDA error in the middle of a round whose privacy spend is already in the ledger.
"""

from __future__ import annotations

import re

import torch

# cpu, cuda, cuda:N: what torch names and a member can check here. Other backends (xpu,
# privateuse1) are refused until someone can run the training tests on them; mps is refused
# because it has no float64, in which DP-SGD's noise is drawn and added (privacy.secure_noise):
# every private round would fail after its spend was recorded.
_DEVICE = re.compile(r"^(cpu|cuda(?::(\d+))?)$")


def resolve_device(name: str) -> torch.device:
    """``name`` as a :class:`torch.device` this process can use; ValueError saying why not."""
    text = str(name).strip().lower()
    match = _DEVICE.match(text)
    if match is None:
        reason = " (mps has no float64, which DP-SGD's noise needs)" if text == "mps" else ""
        raise ValueError(f"device {name!r} is not one of cpu, cuda, cuda:N{reason}")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: this torch build sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
            )
        count = torch.cuda.device_count()
        index = 0 if match.group(2) is None else int(match.group(2))
        if index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), numbered from 0")
    return device
