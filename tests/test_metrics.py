"""Confusion matrix, IoU, trimap accuracy and upsampling error against hand counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsiseg.metrics import ConfusionMatrix, boundary_map, trimap_accuracy, upsampling_error
from wsiseg.sampling.coords import uniform_grid


def test_confusion_matrix_by_hand_with_ignore():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred, target)
    expect = np.zeros((4, 4), dtype=np.int64)
    expect[0, 0] = 1  # [target, pred]
    expect[0, 1] = 1
    expect[1, 1] = 3
    expect[2, 2] = 1
    expect[2, 0] = 1
    assert np.array_equal(cm.matrix, expect)
    iou = cm.iou()
    # class 0: tp 1, union 2 + 2 - 1 = 3; class 1: 3 / (4 + 3 - 3); class 2: 1 / (1 + 2 - 1); class 3 absent
    assert np.allclose(iou[:3], [1 / 3, 3 / 4, 1 / 2])
    assert np.isnan(iou[3])
    assert cm.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)


def test_confusion_matrix_accumulates_torch_and_merges():
    a = ConfusionMatrix(3)
    a.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    a.update(torch.tensor([[2, 2]]), torch.tensor([[2, 0]]))
    b = ConfusionMatrix(3)
    b.update([0, 1, 2, 2], [0, 1, 2, 0])
    assert np.array_equal(a.matrix, b.matrix)
    # dataset IoU = summed intersections / summed unions (not mean of per-update IoUs)
    assert np.allclose(a.iou(), [1 / 2, 1, 1 / 2])
    a += b
    assert a.matrix.sum() == 8
    a.reset()
    assert a.matrix.sum() == 0 and np.isnan(a.miou()) and np.isnan(a.pixel_accuracy())


def test_predicted_but_absent_class_counts_zero():
    cm = ConfusionMatrix(3)
    cm.update([0, 0, 2, 0], [0, 0, 0, 0])
    iou = cm.iou()
    assert iou[0] == 0.75 and iou[2] == 0.0 and np.isnan(iou[1])
    assert cm.miou() == pytest.approx(0.375)


def test_confusion_matrix_errors():
    cm = ConfusionMatrix(2, ignore_index=255)
    with pytest.raises(ValueError):
        cm.update([0, 2], [0, 1])
    with pytest.raises(ValueError):
        cm.update([0, 1], [0, 3])
    with pytest.raises(ValueError):
        cm.update([0, 1, 1], [0, 1])
    cm.update([1, 7], [1, 255])  # ignored target: its prediction is not checked
    assert cm.matrix.sum() == 1
    with pytest.raises(ValueError):
        ConfusionMatrix(0)
    small = ConfusionMatrix(2)
    with pytest.raises(ValueError):
        small += ConfusionMatrix(3)


def test_boundary_map_marks_both_sides():
    y = np.zeros((3, 6), dtype=int)
    y[:, 3:] = 1
    b = boundary_map(y)
    assert b[:, 2].all() and b[:, 3].all() and b.sum() == 6


def test_trimap_bands_by_hand():
    target = np.zeros((6, 10), dtype=int)
    target[:, 5:] = 1  # boundary pixels: columns 4 and 5
    pred = target.copy()
    pred[:, 4] = 1  # wrong column next to the boundary
    pred[:, 0] = 1  # wrong column far away
    acc = trimap_accuracy(pred, target, [1, 2, 3, 10])
    # bands: w=1 cols 4-5 (12 px, 6 wrong); w=2 cols 3-6 (24, 6 wrong);
    # w=3 cols 2-7 (36, 6 wrong); w=10 everything (60, 12 wrong)
    assert np.allclose(acc, [0.5, 0.75, 30 / 36, 0.8])
    # batched torch input gives the same per-width accuracy
    acc_b = trimap_accuracy(
        torch.from_numpy(np.stack([pred, pred])), torch.from_numpy(np.stack([target, target])), [1, 2]
    )
    assert np.allclose(acc_b, [0.5, 0.75])
    # ignore: (0,0) ignored -> it also creates boundary pixels (0,1) (correct) and (1,0) (wrong)
    t2 = target.copy()
    t2[0, 0] = 255
    acc_i = trimap_accuracy(pred, t2, [1], ignore_index=255)
    assert np.allclose(acc_i, [7 / 14])
    # no boundary at all: undefined
    assert np.isnan(trimap_accuracy(target * 0, target * 0, [2])).all()
    with pytest.raises(ValueError):
        trimap_accuracy(pred, target, [0])


def test_upsampling_error_uniform():
    y = torch.zeros(1, 12, 12, dtype=torch.long)
    y[:, :, 6:] = 1  # aligned to factor 3 and 2
    assert upsampling_error(y, uniform_grid(4, 4)[None]) == 1.0
    y2 = torch.zeros(1, 12, 12, dtype=torch.long)
    y2[:, :, 7:] = 1  # not aligned to factor 3
    e = upsampling_error(y2, uniform_grid(4, 4)[None])
    assert 0 < e < 1
    # 3-blocks read columns 1, 4, 7, 10; column 7 is class 1, so columns 6-8 come back
    # as 1: class 0 (cols 0-6) IoU 6/7, class 1 (cols 7-11) IoU 5/6
    assert e == pytest.approx((6 / 7 + 5 / 6) / 2)
    # ignore_index: the ignored value may be read back onto counted pixels (counts as wrong)
    y3 = y.clone()
    y3[:, :3, :3] = 255
    e3 = upsampling_error(y3, uniform_grid(4, 4)[None], ignore_index=255)
    assert e3 == 1.0
    y4 = y.clone()
    y4[:, 1, 1] = 255  # the block centre read for the top-left block
    e4 = upsampling_error(y4, uniform_grid(4, 4)[None], ignore_index=255, num_classes=2)
    # 8 class-0 pixels of that block now read 255: class 0 IoU = (72 - 1 - 8) / (72 - 1)
    assert e4 == pytest.approx(((72 - 1 - 8) / (72 - 1) + 1.0) / 2)
