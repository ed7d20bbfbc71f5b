"""Test-only Forge extension for tests/forge (linked into Forge's extensions/ by the suite, never installed by users):
counts the rows of every UNet call of a generation and writes the count to the infotext as "Test UNet rows", so the
suite measures NFE at the model for any sampler, ours or a peer's (Spectrum Integrated)."""

from modules import scripts

FIELD = "Test UNet rows"


class UNetRowCounter(scripts.Script):
    def title(self):
        return "Test UNet row counter"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_batch(self, p, *args, **kwargs):
        """After Forge's model reload for this batch: count at the model every patcher clone shares (a peer's
        model-function wrapper calls ``model.apply_model`` too)."""
        model = p.sd_model.forge_objects.unet.model
        apply = type(model).apply_model.__get__(model)  # the class's own method: never a counter of a past request
        p.extra_generation_params.setdefault(FIELD, 0)

        def counting(x, t, *a, **kw):
            p.extra_generation_params[FIELD] += x.shape[0]
            return apply(x, t, *a, **kw)

        model.apply_model = counting
