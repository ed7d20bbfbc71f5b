"""An image is the same whatever batch it is generated in: the default's plan depends only on the run's sampler,
schedule and steps, the adaptive rules decide per image, and each image's noise depends only on its own seed.

The network is evaluated one row at a time here: in float32 its batched kernels alone move an image by about 3e-6
between batch sizes under full CFG (measured on the embedded model), which the sampler then carries. Row by row the
network gives each image the same output in any batch, so what is left is the method's own dependence on the batch,
which must be none.
"""

import dataclasses

import pytest
import torch

from adaptive_sampler import oracles as O
from adaptive_sampler.lab.experiment import SAMPLER_VARIANTS, embedded_target, generate_variant


class RowByRow:
    """The embedded denoiser called on one row at a time; its schedule attributes are unchanged."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, sigma, cond):
        return torch.cat([self.model(x[j:j + 1], sigma[j:j + 1], cond=cond[j:j + 1]) for j in range(x.shape[0])])

    def __getattr__(self, name):
        return getattr(self.model, name)


EMBEDDED = embedded_target()
TARGET = dataclasses.replace(EMBEDDED, model=RowByRow(EMBEDDED.model))
SEED, LABEL, POSITION = 11, 3, 5
OTHERS = [(100 + j, j % TARGET.num_classes) for j in range(7)]  # seven other images, other prompts (labels)


@pytest.mark.parametrize("level", list(O.LEVELS))
@pytest.mark.parametrize("variant", list(SAMPLER_VARIANTS))
def test_an_image_is_the_same_alone_and_in_a_batch_of_eight(variant, level):
    alone, summary = generate_variant(TARGET, variant, "karras", 20, 7.0, [LABEL], [SEED],
                                      oracle=O.recommended(level))
    batch = OTHERS[:POSITION] + [(SEED, LABEL)] + OTHERS[POSITION:]
    together, batch_summary = generate_variant(TARGET, variant, "karras", 20, 7.0, [label for _, label in batch],
                                               [seed for seed, _ in batch], oracle=O.recommended(level))
    assert summary.nfe < summary.nfe_full and batch_summary.schedule == summary.schedule
    assert (together[POSITION] - alone[0]).abs().max() <= 1e-6
    assert (together[POSITION + 1] - alone[0]).abs().max() > 1e-2  # the others are other images


def test_per_image_noise_differs_between_seeds_and_repeats_for_a_seed():
    a, _ = generate_variant(TARGET, "euler_ancestral", "default", 12, 3.0, [1, 1], [7, 8])
    b, _ = generate_variant(TARGET, "euler_ancestral", "default", 12, 3.0, [1], [7])
    assert (a[0] - b[0]).abs().max() <= 1e-5 and (a[0] - a[1]).abs().max() > 1e-2


ADAPTIVE_MODES = [m for m in O.HOST_MODES if m not in ("forecast", "off")]


@pytest.mark.parametrize("mode", ADAPTIVE_MODES)
@pytest.mark.parametrize("variant", list(SAMPLER_VARIANTS))
def test_adaptive_rules_decide_per_image_and_evaluate_only_the_rows_that_need_it(variant, mode):
    """AG's cosine and AdaptiveDiffusion's latent differences are each image's own: an image switches and skips
    where it would alone, and a batch spends on each image what that image needs."""
    alone_oracle = O.mode_oracle(mode)
    alone, _ = generate_variant(TARGET, variant, "karras", 20, 7.0, [LABEL], [SEED], oracle=alone_oracle)
    batch = OTHERS[:POSITION] + [(SEED, LABEL)] + OTHERS[POSITION:]
    batch_oracle = O.mode_oracle(mode)
    together, summary = generate_variant(TARGET, variant, "karras", 20, 7.0, [label for _, label in batch],
                                         [seed for seed, _ in batch], oracle=batch_oracle)
    assert batch_oracle.images[POSITION].decisions == alone_oracle.decisions
    assert len({image.summary().schedule for image in batch_oracle.images}) > 1  # the images decided differently
    assert (together[POSITION] - alone[0]).abs().max() <= 1e-6
    assert summary.images == 8 and summary.nfe == sum(image.summary().nfe for image in batch_oracle.images)
