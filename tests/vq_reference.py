"""The VQGAN block math (taming-transformers, and LlamaGen under other key prefixes), re-implemented
from state dicts with plain torch functions, so import tests compare our modules with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def conv(x, sd, p, stride=1, padding=1):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride=stride, padding=padding)


def swish(x):
    return x * torch.sigmoid(x)


def res_block(x, sd, p):
    h = conv(swish(group_norm(x, sd, p + ".norm1")), sd, p + ".conv1")
    h = conv(swish(group_norm(h, sd, p + ".norm2")), sd, p + ".conv2")
    return (conv(x, sd, p + ".nin_shortcut", padding=0) if p + ".nin_shortcut.weight" in sd else x) + h


def attn_block(x, sd, p):
    hn = group_norm(x, sd, p + ".norm")
    q, k, v = (conv(hn, sd, f"{p}.{n}", padding=0) for n in ("q", "k", "v"))
    b, c, h, w = q.shape
    weights = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * int(c) ** -0.5
    out = torch.bmm(v.reshape(b, c, h * w), F.softmax(weights, dim=2).permute(0, 2, 1)).reshape(b, c, h, w)
    return x + conv(out, sd, p + ".proj_out", padding=0)


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    return ((a - b).abs().max() / b.abs().max()).item()
