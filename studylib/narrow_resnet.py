"""A narrow CIFAR ResNet-18 for the CPU-scale SimSiam study (train_simsiam.py --recipe cpu).

The topology of q3_solution.cifar_resnet18 (3x3 stride-1 stem, no max-pool, four stages of two BasicBlocks, global
average pool, `.fc`), with every stage `width_factor` times as wide: at 1/4 the stages have 16, 32, 64 and 128
channels, about 1/16 of the multiply-adds, so that a configuration learns within minutes on one CPU core. Same
keyword arguments as torchvision's resnet18, so `q3_solution.SimSiam(narrow_cifar_resnet18)` works unchanged.
"""
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

WIDTHS = (64, 128, 256, 512)   # ResNet-18's stage widths, scaled by width_factor


class NarrowCifarResNet18(nn.Module):
    def __init__(self, num_classes=1000, zero_init_residual=False, width_factor=0.25):
        super().__init__()
        widths = [max(1, round(w * width_factor)) for w in WIDTHS]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2   # 32x32 -> 32, 16, 8, 4
            down = None
            if stride != 1 or in_planes != planes:
                down = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride, down), BasicBlock(planes, planes)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():   # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:   # each block starts as the identity, as torchvision's flag does
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x):                                     # (B, 3, 32, 32)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))   # (B, 8w, 4, 4)
        return self.fc(self.avgpool(x).flatten(1))            # (B, num_classes)


def narrow_cifar_resnet18(num_classes=1000, zero_init_residual=False, **kwargs):
    return NarrowCifarResNet18(num_classes=num_classes, zero_init_residual=zero_init_residual, **kwargs)
