"""first: the first k units of every space (the weight-selection paper's simplest selection)."""

import torch

from .base import Method


class First(Method):
    name = "first"

    def pick(self, n, k, scores, gen):
        return torch.arange(k)


METHOD = First()
