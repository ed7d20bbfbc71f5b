"""No damaged image on any sampler: every demo oracle on every sampler variant and schedule stays above a PSNR floor
against full CFG with the same seeds and the same noise draws (20 steps, scale 7 - A1111's defaults)."""

import pytest
import torch

from adaptive_sampler.__main__ import DEMO_ORACLES, demo_oracle
from adaptive_sampler.lab.experiment import (SAMPLER_VARIANTS, SCHEDULES, embedded_target, generate_variant,
                                             variant_schedules)
from adaptive_sampler.lab.metrics import psnr

#: The recommended default must give a picture a user cannot tell from full CFG at a glance; every other mode must
#: at least not be damaged (grain or noise: below 15 dB the difference is visible at any size).
FLOORS = {"recommended": 20.0}
DAMAGE_FLOOR = 15.0
STEPS, SCALE = 20, 7.0
LABELS = list(range(10))
SEEDS = [7000 + j for j in range(10)]


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(2)
    return embedded_target()


@pytest.mark.parametrize("variant,schedule", variant_schedules(list(SAMPLER_VARIANTS), list(SCHEDULES)))
def test_every_demo_oracle_stays_above_its_psnr_floor(target, variant, schedule):
    reference, _ = generate_variant(target, variant, schedule, STEPS, SCALE, LABELS, SEEDS)
    failures = []
    for name in DEMO_ORACLES:
        if name == "full":
            continue
        label, oracle = demo_oracle(name, SAMPLER_VARIANTS[variant][0], STEPS, schedule)
        images, summary = generate_variant(target, variant, schedule, STEPS, SCALE, LABELS, SEEDS, oracle=oracle)
        quality = float(psnr(images, reference).mean())
        floor = FLOORS.get(name, DAMAGE_FLOOR)
        if not quality >= floor:
            failures.append(f"{label}: {quality:.1f} dB < {floor} dB at NFE {summary.nfe}/{summary.nfe_full}")
    assert not failures, f"{variant} / {schedule}: " + "; ".join(failures)
