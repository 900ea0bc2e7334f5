"""DPO-family losses checked against hand calculations on plain floats (``math``), not torch.

The shared batch has two pairs (policy chosen, policy rejected, reference chosen, reference rejected):

    pair 0: (-10.0, -12.0, -11.0, -11.5)  ->  logits = (-10 + 12) - (-11 + 11.5) = 2.0 - 0.5 =  1.5
    pair 1: (-13.0, -12.0, -12.0, -12.5)  ->  logits = (-13 + 12) - (-12 + 12.5) = -1.0 - 0.5 = -1.5
"""

from __future__ import annotations

import math

import pytest
import torch

from zephyr_lit.losses import DPOOutput, LossType, check_loss_args, dpo_loss

PI_C, PI_R, REF_C, REF_R = [-10.0, -13.0], [-12.0, -12.0], [-11.0, -12.0], [-11.5, -12.5]
LOGITS = [1.5, -1.5]


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)) = -log(1 + e^-x)."""
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def batch(requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.tensor(v, requires_grad=requires_grad) for v in (PI_C, PI_R, REF_C, REF_R)]


def losses(loss_type: str, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return dpo_loss(loss_type, *batch(), beta=beta, label_smoothing=label_smoothing).losses


def test_sigmoid_by_hand():
    # beta = 0.1: beta * logits = +-0.15.
    # pair 0: -log sigmoid(0.15)  = log(1 + e^-0.15) = log(1.860708) = 0.620957
    # pair 1: -log sigmoid(-0.15) = log(1 + e^0.15)  = log(2.161834) = 0.770957
    expected = [-log_sigmoid(0.1 * z) for z in LOGITS]
    assert expected == pytest.approx([0.620957, 0.770957], abs=1e-6)
    assert losses("sigmoid", beta=0.1).tolist() == pytest.approx(expected, rel=1e-6)


def test_cdpo_label_smoothing_by_hand():
    # eps = 0.1: -(0.9) log sigmoid(bz) - 0.1 log sigmoid(-bz)
    # pair 0: 0.9 * 0.620957 + 0.1 * 0.770957 = 0.558861 + 0.077096 = 0.635957
    # pair 1: 0.9 * 0.770957 + 0.1 * 0.620957 = 0.693861 + 0.062096 = 0.755957
    eps = 0.1
    expected = [-(1 - eps) * log_sigmoid(0.1 * z) - eps * log_sigmoid(-0.1 * z) for z in LOGITS]
    assert expected == pytest.approx([0.635957, 0.755957], abs=1e-6)
    assert losses("sigmoid", beta=0.1, label_smoothing=eps).tolist() == pytest.approx(expected, rel=1e-6)


def test_robust_by_hand():
    # eps = 0.1: (-(0.9) log sigmoid(bz) + 0.1 log sigmoid(-bz)) / (1 - 0.2)
    # pair 0: (0.9 * 0.620957 - 0.1 * 0.770957) / 0.8 = (0.558861 - 0.077096) / 0.8 = 0.602207
    # pair 1: (0.9 * 0.770957 - 0.1 * 0.620957) / 0.8 = (0.693861 - 0.062096) / 0.8 = 0.789707
    eps = 0.1
    expected = [(-(1 - eps) * log_sigmoid(0.1 * z) + eps * log_sigmoid(-0.1 * z)) / (1 - 2 * eps) for z in LOGITS]
    assert expected == pytest.approx([0.602207, 0.789707], abs=1e-6)
    assert losses("robust", beta=0.1, label_smoothing=eps).tolist() == pytest.approx(expected, rel=1e-6)


def test_robust_without_smoothing_is_sigmoid():
    torch.testing.assert_close(losses("robust", beta=0.1), losses("sigmoid", beta=0.1))


def test_ipo_by_hand():
    # beta = 0.1: target margin 1 / (2 * 0.1) = 5.
    # pair 0: (1.5 - 5)^2 = (-3.5)^2 = 12.25;  pair 1: (-1.5 - 5)^2 = (-6.5)^2 = 42.25
    expected = [(z - 1 / (2 * 0.1)) ** 2 for z in LOGITS]
    assert expected == pytest.approx([12.25, 42.25])
    assert losses("ipo", beta=0.1).tolist() == pytest.approx(expected, rel=1e-6)
    # label_smoothing does not enter IPO (as in TRL)
    torch.testing.assert_close(losses("ipo", beta=0.1, label_smoothing=0.2), losses("ipo", beta=0.1))


def test_hinge_by_hand():
    # beta = 1: pair 0: relu(1 - 1.5) = relu(-0.5) = 0;  pair 1: relu(1 + 1.5) = 2.5
    assert losses("hinge", beta=1.0).tolist() == pytest.approx([0.0, 2.5])
    # beta = 0.1: relu(1 - 0.15) = 0.85;  relu(1 + 0.15) = 1.15
    assert losses("hinge", beta=0.1).tolist() == pytest.approx([0.85, 1.15], rel=1e-6)


def test_enum_and_string_agree():
    for kind in LossType:
        torch.testing.assert_close(losses(kind, beta=0.1), losses(kind.value, beta=0.1))


def test_rewards_are_detached_and_by_hand():
    # beta = 0.5: chosen   = 0.5 * (-10 + 11, -13 + 12)     = (0.5, -0.5)
    #             rejected = 0.5 * (-12 + 11.5, -12 + 12.5) = (-0.25, 0.25)
    pi_c, pi_r, ref_c, ref_r = batch(requires_grad=True)
    out = dpo_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, beta=0.5, label_smoothing=0.0)
    assert isinstance(out, DPOOutput)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25, 0.25])
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.requires_grad and out.losses.shape == (2,)
    out.losses.sum().backward()
    assert pi_c.grad is not None and pi_r.grad is not None


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_values_when_policy_equals_reference(beta):
    # logits = 0: sigmoid -> -log(1/2) = ln 2; ipo -> (0 - 1/(2b))^2 = 1/(4b^2); hinge -> relu(1) = 1
    same = torch.tensor([-7.0, -3.0, -20.0])
    other = torch.tensor([-9.0, -1.0, -25.0])

    def at_ref(kind: str) -> torch.Tensor:
        return dpo_loss(kind, same, other, same, other, beta=beta, label_smoothing=0.0).losses

    torch.testing.assert_close(at_ref("sigmoid"), torch.full((3,), math.log(2.0)))
    torch.testing.assert_close(at_ref("robust"), torch.full((3,), math.log(2.0)))
    torch.testing.assert_close(at_ref("ipo"), torch.full((3,), 1 / (4 * beta**2)))
    torch.testing.assert_close(at_ref("hinge"), torch.ones(3))
    out = dpo_loss("sigmoid", same, other, same, other, beta=beta)
    torch.testing.assert_close(out.chosen_rewards, torch.zeros(3))


def test_sigmoid_gradient_by_hand():
    # d/d pi_c of -log sigmoid(b z), z = pi_c - pi_r - ref_c + ref_r, dz/d pi_c = 1:
    #   -b * (1 - sigmoid(b z)) = -b * sigmoid(-b z)
    # pair 0: -0.1 * sigmoid(-0.15) = -0.1 * 0.462570 = -0.0462570
    # pair 1: -0.1 * sigmoid(0.15)  = -0.1 * 0.537430 = -0.0537430
    pi_c, pi_r, ref_c, ref_r = batch(requires_grad=True)
    dpo_loss("sigmoid", pi_c, pi_r, ref_c, ref_r, beta=0.1).losses.sum().backward()
    expected = [-0.1 * sigmoid(-0.1 * z) for z in LOGITS]
    assert expected == pytest.approx([-0.0462570, -0.0537430], abs=1e-7)
    assert pi_c.grad.tolist() == pytest.approx(expected, rel=1e-5)
    assert (pi_c.grad < 0).all()  # raising the chosen log-prob lowers the loss
    assert pi_r.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-5)


def test_fp32_output_for_low_precision_inputs():
    out = dpo_loss("sigmoid", *(t.to(torch.bfloat16) for t in batch()), beta=0.1)
    assert out.losses.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError):
        dpo_loss("kto", *batch(), beta=0.1)


def test_check_loss_args():
    assert check_loss_args("sigmoid", 0.1, 0.0) == []
    assert check_loss_args("robust", 0.01, 0.499) == []

    (msg,) = check_loss_args("sigmiod", 0.1, 0.0)
    assert "sigmiod" in msg
    assert all(name in msg for name in ("sigmoid", "robust", "ipo", "hinge"))

    for beta in (0.0, -0.1):
        (msg,) = check_loss_args("ipo", beta, 0.0)
        assert "beta" in msg and str(beta) in msg

    for eps in (0.5, -0.1, 1.0):
        (msg,) = check_loss_args("sigmoid", 0.1, eps)
        assert "label_smoothing" in msg and str(eps) in msg

    assert len(check_loss_args("nope", 0.0, 0.7)) == 3
