"""activation: scores from the parent's activations on calibration data (shrinkit.calibrate):
mean |input| per index of the modules that read a space, each head's contribution to the
residual stream, the residual stream's mean |x| for hidden dims, router load for experts."""

from .base import Method


class Activation(Method):
    name = "activation"
    reads_data = True

    def scores(self, ctx, stage, need, layers):
        from ..calibrate import activation_scores
        from .base import outside_spaces
        spec = ctx.spec(stage)
        scores = activation_scores(ctx.calibration(stage), ctx.plan, need)
        outside = outside_spaces(ctx.plan) & need
        if outside:   # a pooling head outside the blocks (calibration runs only the blocks): by its weights
            from .magnitude import magnitude_scores
            scores = {**magnitude_scores(ctx.ckpt, ctx.plan, outside, set()), **scores}
        return scores, {"calibration": spec.model_dump()}


METHOD = Activation()
