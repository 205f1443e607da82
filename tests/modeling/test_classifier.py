"""ImageClassifier and its backbones: parameter counts of ResNet-32 and ResNet-10 against
their known values, the losses a classification head takes, and SEQL's gradient inside the
head against eq. 9-11 (float64, closed form and gradcheck)."""

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_backbone, build_model
from torchvision.models.resnet import BasicBlock, ResNet

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models)
from eql_d2.config import get_eql_cfg
from eql_d2.modeling.backbone import CifarResNet
from eql_d2.modeling.cls_losses import SEQL, losses_for_head

NUM_CLASSES = 6
# training images per class; with lambda 0.1 classes 3, 4, 5 (f < 0.1) are tail classes
COUNTS = [40, 30, 20, 5, 3, 2]


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_resnet32_has_the_parameters_of_he_et_al():
    # He et al. (2016), Tab. 6: ResNet-32 on CIFAR-10 has 0.46M parameters; with option-A
    # shortcuts, 31 convolutions with BN and a 10-class classifier that is exactly:
    convs = (3 * 16 * 9 + 10 * 16 * 16 * 9 + (16 * 32 + 9 * 32 * 32) * 9
             + (32 * 64 + 9 * 64 * 64) * 9)
    bns = 2 * (16 + 10 * 16 + 10 * 32 + 10 * 64)
    assert convs + bns + 64 * 10 + 10 == 464154
    backbone = CifarResNet(32)
    assert num_params(backbone) + num_params(torch.nn.Linear(64, 10)) == 464154
    out = backbone(torch.zeros(2, 3, 32, 32))
    assert out["stage3"].shape == (2, 64, 8, 8)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(30)


def test_resnet10_is_torchvisions_basic_resnet_with_one_block_per_stage():
    cfg = get_eql_cfg("configs/Classification/Base-ImageNet-LT-ResNet10.yaml")
    backbone = build_backbone(cfg)
    reference = ResNet(BasicBlock, [1, 1, 1, 1])  # OLTR's ResNet-10 is this torchvision model
    expected = num_params(reference) - num_params(reference.fc)
    # closed form: the 7x7 stem, res2 (two 3x3 of 64), res3-res5 (two 3x3 and a 1x1
    # projection shortcut each), every convolution followed by BN (2 parameters a channel)
    closed = 3 * 64 * 49 + 2 * 64 + 2 * (64 * 64 * 9 + 2 * 64)
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
        closed += (c_in * c_out * 9 + c_out * c_out * 9 + c_in * c_out) + 3 * 2 * c_out
    assert num_params(backbone) == expected == closed == 4_905_792
    shapes = sorted(tuple(p.shape) for p in backbone.parameters())
    assert shapes == sorted(tuple(p.shape) for n, p in reference.named_parameters()
                            if not n.startswith("fc."))
    assert backbone(torch.zeros(1, 3, 64, 64))["res5"].shape == (1, 512, 2, 2)


def train_set(name="t_classifier_train"):
    meta = MetadataCatalog.get(name)
    if meta.get("class_image_count") is None:
        meta.set(thing_classes=[f"c{k}" for k in range(NUM_CLASSES)],
                 class_image_count=[{"id": k + 1, "image_count": n}
                                    for k, n in enumerate(COUNTS)],
                 num_train_images=sum(COUNTS))
    return name


def classifier_cfg(loss, **overrides):
    cfg = get_eql_cfg("configs/Classification/Base-CIFAR100-LT-ResNet32.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CIFAR_RESNET.DEPTH = 8
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.CLS_LOSS.NAME = loss
    cfg.MODEL.CLS_LOSS.SEQL.LAMBDA = 0.1
    cfg.MODEL.CLS_LOSS.SEQL.GAMMA = 0.5
    cfg.DATASETS.TRAIN = (train_set(),)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def batch(n=8, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, size, size, generator=g, dtype=torch.float64) * 255,
             "label": int(torch.randint(NUM_CLASSES, (), generator=g))} for _ in range(n)]


def test_classification_heads_take_the_losses_declared_for_them():
    assert set(losses_for_head("classification")) == {"SoftmaxCE", "Focal", "SEQL",
                                                       "ClassBalanced"}
    model = build_model(classifier_cfg("ClassBalanced", **{
        "MODEL.CLS_LOSS.CLASS_BALANCED.FORM": "softmax"}))
    assert torch.isfinite(model(batch(4, seed=5))["loss_cls"])
    model = build_model(classifier_cfg(""))
    assert type(model.criterion).__name__ == "SoftmaxCE"  # the default
    with pytest.raises(ValueError, match="does not work with classification heads"):
        build_model(classifier_cfg("EQL"))
    model = build_model(classifier_cfg("Focal"))
    # a sigmoid loss starts every class at probability 1 / C
    assert torch.allclose(model.fc.bias, torch.full((NUM_CLASSES,), -torch.log(torch.tensor(5.0))))
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 8, 8)}, {"image": torch.ones(3, 8, 8)}])
    assert len(out) == 2 and out[0]["scores"].shape == (NUM_CLASSES,)


def test_seql_without_training_frequencies_refuses_to_train():
    cfg = classifier_cfg("SEQL")
    cfg.DATASETS.TRAIN = ("t_classifier_unloaded",)
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():  # inference needs no frequencies: the plain softmax
        scores = model(batch(2, seed=3))[0]["scores"]
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-5)
    model.train()
    with pytest.raises(ValueError, match="SEQL cannot train this model"):
        model(batch(2))


def seql_model():
    torch.manual_seed(0)
    model = build_model(classifier_cfg("SEQL")).double()
    model.train()
    assert isinstance(model.criterion, SEQL)
    assert model.criterion.tail.tolist() == [3, 4, 5]
    return model


def test_seql_gradient_in_the_head_is_eq_9_to_11():
    model, inputs = seql_model(), batch(16)
    kept = {}

    def keep_logits(module, args, out):
        out.retain_grad()
        kept["z"] = out

    model.fc.register_forward_hook(keep_logits)
    torch.manual_seed(7)
    loss = model(inputs)["loss_cls"]
    loss.backward()
    z, labels = kept["z"].detach(), torch.tensor([x["label"] for x in inputs])
    # eq. 11 with the same draws: beta ~ Bernoulli(gamma) per image and tail class
    torch.manual_seed(7)
    beta = torch.rand(len(inputs), 3) < 0.5
    w = torch.ones_like(z)
    y = torch.nn.functional.one_hot(labels, NUM_CLASSES).double()
    w[:, 3:] = 1 - beta.double() * (1 - y[:, 3:])
    assert (w == 0).any() and (w[y.bool()] == 1).all()
    # eq. 9-10: L = mean_i -log(e^{z_c} / sum_k w_k e^{z_k}); dL/dz_j = (w_j p~_j - y_j) / N
    p = w * z.exp() / (w * z.exp()).sum(1, keepdim=True)
    expected_loss = -(torch.log((z.exp() * y).sum(1) / (w * z.exp()).sum(1))).mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert torch.allclose(kept["z"].grad, (p - y) / len(inputs), atol=1e-12, rtol=0)


def test_seql_gradcheck_through_the_classifier():
    model, inputs = seql_model(), batch(4)

    def loss_of(weight, bias):
        torch.manual_seed(11)  # the same beta draws at every evaluation
        model.fc.weight.data, model.fc.bias.data = weight, bias
        return model(inputs)["loss_cls"]

    weight = model.fc.weight.detach().clone().requires_grad_()
    bias = model.fc.bias.detach().clone().requires_grad_()

    # the head's parameters as inputs, the rest of the model fixed: its features once
    with torch.no_grad():
        features = torch.nn.functional.adaptive_avg_pool2d(
            model.backbone(model.preprocess_image(inputs))["stage3"], 1).flatten(1)
    labels = torch.tensor([x["label"] for x in inputs])

    def through(w, b):
        torch.manual_seed(11)
        logits = features @ w.t() + b
        return model.criterion.head_loss(logits, labels, float(len(inputs)))

    assert torch.autograd.gradcheck(through, (weight, bias), eps=1e-6, atol=1e-7)
    # the head's own forward gives the same loss as the function checked
    assert loss_of(weight.detach(), bias.detach()).item() == pytest.approx(
        through(weight, bias).item(), rel=1e-12)


@pytest.mark.parametrize("config,points", [
    # CIFAR-100-LT: 0.1 -> 0.2 over 400 iterations, x0.1 at 6.4k and 9.6k
    ("cifar100_lt_R32_seql.yaml", {0: 0.1, 200: 0.15, 400: 0.2, 6399: 0.2, 6400: 0.02,
                                   9600: 0.002, 12799: 0.002}),
    # ImageNet-LT: 0.1 -> 0.4 over 500 iterations, /10 at 3.4k, 6.8k and 10.2k
    ("imagenet_lt_R10_seql.yaml", {0: 0.1, 250: 0.25, 500: 0.4, 3399: 0.4, 3400: 0.04,
                                   6800: 0.004, 10200: 0.0004, 11999: 0.0004}),
])
def test_learning_rate_schedules_of_sec_6(config, points):
    from detectron2.solver import build_lr_scheduler

    cfg = get_eql_cfg(f"configs/Classification/{config}")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for it in range(cfg.SOLVER.MAX_ITER):
        if it in points:
            assert optimizer.param_groups[0]["lr"] == pytest.approx(points[it], rel=1e-9), it
        optimizer.step()
        scheduler.step()
