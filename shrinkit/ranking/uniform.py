"""uniform: k units evenly spaced over the n (weight selection's uniform selection)."""

import torch

from .base import Method


class Uniform(Method):
    name = "uniform"

    def pick(self, n, k, scores, gen):
        return torch.tensor([(i * n) // k for i in range(k)])


METHOD = Uniform()
