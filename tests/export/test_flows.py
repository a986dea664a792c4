from __future__ import annotations

import pytest
import torch
import zuko

from calopc.export.flows import AutoregressiveInverse, FlowInverse, loop_invertible


def _sharpen(flow, scale=3.0):
    """Scale every weight of the flow's hyper networks: features depend strongly on earlier ones and on the
    context, so an inversion that reads a wrong feature or stops a step early is off by O(1), not 1e-3."""
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(scale)
    return flow


def _flows():
    """Flows of the shapes calopc samples from: (name, flow, features, context size, loops expected)."""
    torch.manual_seed(0)
    return [
        # CaloClouds' / CaloPointFlow's shower model: NSF over 2L features, log E_inc as context, autoregressive
        ("shower-nsf", zuko.flows.NSF(10, 1, transforms=2, hidden_features=[16, 16]), 10, 1, 2),
        # CaloPointFlow II's latent flow: NSF over the latent, context (log E_inc, shower features)
        ("latent-nsf", zuko.flows.NSF(4, 11, transforms=2, hidden_features=[16]), 4, 11, 2),
        # affine MAF with random feature orders (the order is not the identity)
        ("maf-randperm", zuko.flows.MAF(6, 3, transforms=3, hidden_features=[16, 16], randperm=True), 6, 3, 3),
        # the coupling shower model (shower_passes=2): zuko's own inversion
        ("shower-coupling", zuko.flows.NSF(10, 1, transforms=2, hidden_features=[16], passes=2), 10, 1, 0),
        # unconditional
        ("no-context", zuko.flows.NSF(5, 0, transforms=2, hidden_features=[16]), 5, 0, 2),
    ]


@pytest.mark.parametrize("case", range(5))
def test_flow_inverse_equals_zukos_inverse(case):
    """FlowInverse(flow)(c, z) is zuko's flow(c).transform.inv(z) to float32 rounding for the shower and latent
    flows' shapes (autoregressive NSF, MAF with random orders, coupling, no context), inverts the flow (the
    forward transform maps it back to z), and loops exactly the fully autoregressive transforms."""
    name, flow, f, ctx, loops = _flows()[case]
    _sharpen(flow)
    inv = FlowInverse(flow).eval()
    assert inv.loops == loops, name
    g = torch.Generator().manual_seed(case)
    c = torch.randn(64, ctx, generator=g) if ctx else None
    z = torch.randn(64, f, generator=g) * 1.5
    with torch.no_grad():
        ref = flow(c).transform.inv(z)
        got = inv(c, z)
        back = flow(c).transform(got)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(back, z, rtol=0, atol=5e-3)   # float32 splines, steep bins
    assert (ref - z).abs().max() > 0.5          # the flow is far from the identity


def test_loop_invertible_accepts_only_fully_autoregressive_masked_transforms():
    """Fully autoregressive masked transforms (features > 2) are looped; coupling (passes=2), two features,
    residual hyper networks and the one-feature element-wise transform are left to zuko."""
    def first(flow):
        return flow.transform.transforms[0]

    assert loop_invertible(first(zuko.flows.NSF(5, 1, transforms=1)))
    assert loop_invertible(first(zuko.flows.MAF(3, 0, transforms=1)))
    assert not loop_invertible(first(zuko.flows.NSF(5, 1, transforms=1, passes=2)))
    assert not loop_invertible(first(zuko.flows.NSF(5, 1, transforms=1, passes=3)))
    assert not loop_invertible(first(zuko.flows.NSF(2, 1, transforms=1)))
    assert not loop_invertible(first(zuko.flows.NSF(5, 1, transforms=1, residual=True)))
    assert not loop_invertible(first(zuko.flows.NSF(1, 1, transforms=1)))


def test_exported_loop_is_one_while_loop_with_the_same_result():
    """Under torch.export the inverse is one while_loop (the step traced once, not F unrolled copies of the
    network) and the exported program gives the eager result."""
    torch.manual_seed(1)
    flow = _sharpen(zuko.flows.NSF(12, 1, transforms=1, hidden_features=[16]))
    inv = AutoregressiveInverse(flow.transform.transforms[0]).eval()
    g = torch.Generator().manual_seed(2)
    c, z = torch.randn(8, 1, generator=g), torch.randn(8, 12, generator=g)
    with torch.no_grad():
        ep = torch.export.export(inv, (c, z))
        loops = [n for n in ep.graph.nodes if n.target is torch.ops.higher_order.while_loop]
        assert len(loops) == 1
        assert sum(n.target is torch.ops.aten.linear.default for n in ep.graph.nodes) == 0
        torch.testing.assert_close(ep.module()(c, z), flow(c).transform.inv(z), rtol=1e-5, atol=2e-5)
