"""The VQGAN blocks (taming-transformers, and LlamaGen under other key prefixes) re-implemented for
import tests: their state-dict shapes, and their math from state dicts with plain torch functions."""

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


class StateShapes(dict):
    """Key -> shape of a VQGAN-family state dict, filled block by block (conv, GroupNorm, ResNet, attention)."""

    def conv(self, p, cin, cout, k):
        self[p + ".weight"], self[p + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(self, p, c):
        self[p + ".weight"], self[p + ".bias"] = (c,), (c,)

    def res(self, p, cin, cout):
        self.norm(p + ".norm1", cin), self.conv(p + ".conv1", cin, cout, 3)
        self.norm(p + ".norm2", cout), self.conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            self.conv(p + ".nin_shortcut", cin, cout, 1)

    def attn(self, p, c):
        self.norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            self.conv(f"{p}.{n}", c, c, 1)
