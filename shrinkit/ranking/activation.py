"""activation: scores from the parent's activations on calibration data (shrinkit.calibrate):
mean |input| per index of the modules that read a space, each head's contribution to the
residual stream, the residual stream's mean |x| for hidden dims, router load for experts."""

from .base import Method


class Activation(Method):
    name = "activation"
    reads_data = True

    def scores(self, ctx, stage, need, layers):
        from ..calibrate import activation_scores
        spec = ctx.spec(stage)
        return activation_scores(ctx.calibration(stage), ctx.plan, need), {"calibration": spec.model_dump()}


METHOD = Activation()
