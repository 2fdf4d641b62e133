"""random: k units drawn at random (seeded by the recipe's seed), kept in order."""

import torch

from .base import Method


class Random(Method):
    name = "random"

    def pick(self, n, k, scores, gen):
        return torch.sort(torch.randperm(n, generator=gen)[:k]).values


METHOD = Random()
