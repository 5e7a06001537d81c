"""studylib.probe (2.3b): the linear probe and the U-Net feature hook, against constructed oracles."""
import pytest
import torch

import ddpm_solution
from studylib.probe import linear_probe, parse_t_list, unet_features

pytestmark = pytest.mark.usefixtures('isolated_torch_state')


def test_linear_probe_finds_a_linear_rule_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1200,), generator=g)
    centres = 3 * torch.randn(10, 20, generator=g)
    separable = centres[labels] + 0.3 * torch.randn(1200, 20, generator=g)       # classes far apart: ~100%
    acc, _ = linear_probe(separable[:1000], labels[:1000], separable[1000:], labels[1000:])
    assert acc >= 98
    noise = torch.randn(1200, 20, generator=g)                                    # no information: ~10%
    acc, _ = linear_probe(noise[:1000], labels[:1000], noise[1000:], labels[1000:])
    assert acc <= 22   # 200 test points: chance 10% +- 2.1% (1 SE); 22% is > 5 SE above chance


def test_unet_features_are_the_pooled_middle_block_and_leave_the_model_unchanged():
    model = ddpm_solution.Unet(dim=8, dim_mults=(1, 2)).eval()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 5, 9])
    seen = {}
    model.mid_block2.register_forward_hook(lambda m, i, o: seen.setdefault('out', o))
    with torch.no_grad():
        before = model(x, t)
    features = unet_features(model, x, t)
    assert features.shape == (3, 16)                                              # 2*dim channels, pooled
    assert torch.allclose(features, seen['out'].mean(dim=(2, 3)))
    assert len(model.mid_block2._forward_hooks) == 1                              # ours removed, the test's kept
    with torch.no_grad():
        assert torch.equal(model(x, t), before)


def test_t_list_parsing():
    assert parse_t_list('250,0,50,0') == [0, 50, 250]
    import argparse
    for bad in ('a,1', '-1,5'):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_t_list(bad)
