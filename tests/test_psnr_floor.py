"""No damaged image on any sampler of either model family: every demo oracle on every sampler variant and schedule
stays above a PSNR floor against full CFG with the same seeds and the same noise draws (20 steps; scale 7 on the
SD-style model - A1111's defaults -, scale 5 on the flow model at shift 1 and 3)."""

import pytest
import torch

from adaptive_sampler.__main__ import DEMO_ORACLES, demo_oracle
from adaptive_sampler.lab.experiment import (FLOW_SCHEDULES, SAMPLER_VARIANTS, SCHEDULES, embedded_target,
                                             generate_variant, variant_schedules, variants_for)
from adaptive_sampler.lab.metrics import psnr

#: The recommended default must give a picture a user cannot tell from full CFG at a glance; every other mode must
#: at least not be damaged (grain or noise: below 15 dB the difference is visible at any size).
FLOORS = {"recommended": 20.0}
DAMAGE_FLOOR = 15.0
STEPS, SCALE, FLOW_SCALE = 20, 7.0, 5.0
LABELS = list(range(10))
SEEDS = [7000 + j for j in range(10)]


TARGETS = {}


def target_of(family):
    if family not in TARGETS:
        torch.set_num_threads(2)
        TARGETS[family] = embedded_target(family)
    return TARGETS[family]


CELLS = ([("sd", v, s) for v, s in variant_schedules(list(SAMPLER_VARIANTS), list(SCHEDULES))]
         + [("flow", v, s) for v, s in variant_schedules(variants_for(target_of("flow")), list(FLOW_SCHEDULES))])


@pytest.mark.parametrize("family,variant,schedule", CELLS)
def test_every_demo_oracle_stays_above_its_psnr_floor(family, variant, schedule):
    target = target_of(family)
    scale = FLOW_SCALE if target.flow else SCALE
    reference, _ = generate_variant(target, variant, schedule, STEPS, scale, LABELS, SEEDS)
    failures = []
    for name in DEMO_ORACLES:
        if name == "full":
            continue
        label, oracle = demo_oracle(name, SAMPLER_VARIANTS[variant][0], STEPS, schedule)
        images, summary = generate_variant(target, variant, schedule, STEPS, scale, LABELS, SEEDS, oracle=oracle)
        quality = float(psnr(images, reference).mean())
        floor = FLOORS.get(name, DAMAGE_FLOOR)
        if not quality >= floor:
            failures.append(f"{label}: {quality:.1f} dB < {floor} dB at NFE {summary.nfe}/{summary.nfe_full}")
    assert not failures, f"{family}: {variant} / {schedule}: " + "; ".join(failures)
