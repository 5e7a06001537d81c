"""Problem 3: SimSiam (Chen & He, 2021, "Exploring Simple Siamese Representation Learning") on CIFAR-10.

Self-contained solution module: it imports only the standard library, numpy and torch (torchvision only inside
`cifar_resnet18`, so that importing this module stays fast), so a course autograder can import it alone. Names,
arguments and return values follow the assignment template (docs/api.md).

Two augmented views x1, x2 of one image go through the same encoder f (backbone + projection MLP) and a
prediction MLP h (paper Fig. 1, Sec. 3):

    z1, z2 = f(x1), f(x2)                                            (B, dim)
    p1, p2 = h(z1), h(z2)                                            (B, dim)
    D(p, z) = - p/||p|| . z/||z||                                    negative cosine similarity (Sec. 3)
    L = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1))           symmetrised (Sec. 3; Sec. 4.6)

What the ablations of Sec. 4 say the pieces are for, and what the switches of `SimSiam` reproduce:
  * stop-gradient (Sec. 4.1, Fig. 2): without it the outputs collapse to a constant at once (loss -> -1, kNN
    accuracy -> chance). `stop_gradient=False` removes it.
  * predictor h (Sec. 4.2, Table 1): removing it (`MLP_mode='no_pred_mlp'`) or freezing it at its random
    initialisation (`MLP_mode='fixed_random_init'`) makes training fail.
  * BN in the MLPs (Sec. 3 and Sec. 4.4, Table 3): the projector has BN after every fc layer, its output BN
    included (without affine parameters here, as in the official code); the predictor has BN on its hidden
    layer only, its output layer has neither BN nor ReLU.

Also here: `cifar_resnet18`, the CIFAR variant of ResNet-18 used in the paper's CIFAR experiments (3x3 stride-1
stem, no max-pool), and `knn_predict`, the weighted kNN monitor of Wu et al. (2018) that tracks representation
quality during pre-training.
"""
import random

import numpy as np
import torch
import torch.nn as nn

# Template constants.
device = 'cuda' if torch.cuda.is_available() else 'cpu'


def fix_experiment_seed(seed=0):
    """Seed python, numpy and torch (CPU and every GPU) and make cuDNN pick deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def bdot(a, b):
    """Batched dot product: (B, D), (B, D) -> (B,), row b is a[b] . b[b]."""
    B, S = a.shape
    return torch.bmm(a.view(B, 1, S), b.view(B, S, 1)).reshape(B)


class CosineSimilarity(nn.Module):
    """Cosine similarity along `dim`: x1 . x2 / max(||x1|| * ||x2||, eps); (B, D), (B, D) -> (B,).

    The clamp acts on the PRODUCT of the norms (the assignment's definition). torch.nn.functional.cosine_similarity
    (recent versions) clamps each norm separately, x1 . x2 / (max(||x1||, eps) * max(||x2||, eps)); the two agree
    whenever ||x1|| * ||x2|| >= eps and each norm >= eps, i.e. everywhere except near-zero vectors. For example,
    two parallel vectors of norm 1e-5 give 1 with torch's version and 1e-10 / 1e-8 = 0.01 here; a zero vector
    gives 0 with both.
    """
    __constants__ = ['dim', 'eps']

    def __init__(self, dim=1, eps=1e-8):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x1, x2):
        dot = (x1 * x2).sum(dim=self.dim)                                          # (B,)
        norms = x1.norm(dim=self.dim) * x2.norm(dim=self.dim)                      # (B,)
        return dot / norms.clamp_min(self.eps)


class SimSiam(nn.Module):
    """SimSiam: encoder f = backbone + 3-layer projection MLP, prediction MLP h (paper Sec. 3).

    base_encoder: a callable such as torchvision.models.resnet18 or `cifar_resnet18`, called as
        base_encoder(num_classes=dim, zero_init_residual=True); it must expose its last layer as `.fc`.
    dim: feature dimension (projector output, predictor input and output).
    pred_dim: hidden dimension of the predictor (the bottleneck of Sec. 3, 512 for dim 2048).
    stop_gradient: detach z in `forward` (Sec. 4.1); False is the collapsing ablation.
    MLP_mode: None (trainable predictor), 'fixed_random_init' (predictor frozen at a N(0, 0.01^2) init) or
        'no_pred_mlp' (predictor = identity), the ablations of Sec. 4.2 / Table 1.
    """

    def __init__(self, base_encoder, dim=2048, pred_dim=512, stop_gradient=True, MLP_mode=None):
        super().__init__()
        if MLP_mode not in (None, 'fixed_random_init', 'no_pred_mlp'):
            raise ValueError(f"MLP_mode must be None, 'fixed_random_init' or 'no_pred_mlp', got {MLP_mode!r}")
        self.stop_gradient = stop_gradient
        self.MLP_mode = MLP_mode

        # zero_init_residual: every residual branch starts as zero, so each block starts as the identity (the
        # official code passes it; it helps large-batch SGD).
        self.encoder = base_encoder(num_classes=dim, zero_init_residual=True)
        prev_dim = self.encoder.fc.weight.shape[1]                 # 512 for ResNet-18
        original_fc = self.encoder.fc                              # prev_dim -> dim
        # The backbone's classifier becomes the last layer of a 3-layer projection MLP with BN on every layer and
        # no ReLU on the output (Sec. 3; Sec. 4.4 / Table 3 for the BN choices).
        self.encoder.fc = nn.Sequential(
            nn.Linear(prev_dim, prev_dim, bias=False),             # biases before BN are redundant
            nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            nn.Linear(prev_dim, prev_dim, bias=False),
            nn.BatchNorm1d(prev_dim),
            nn.ReLU(inplace=True),
            original_fc,                                           # (B, dim)
            nn.BatchNorm1d(dim, affine=False),
        )
        # The BN that follows subtracts the batch mean, so this bias has no effect on the output (and gets a zero
        # gradient): freeze it, as the official code does, so that weight decay does not shrink a dead parameter.
        self.encoder.fc[6].bias.requires_grad = False

        if MLP_mode == 'no_pred_mlp':
            self.predictor = nn.Identity()
        else:
            # 2-layer bottleneck predictor: BN + ReLU on the hidden layer, plain linear output (Sec. 3).
            self.predictor = nn.Sequential(
                nn.Linear(dim, pred_dim, bias=False),
                nn.BatchNorm1d(pred_dim),
                nn.ReLU(inplace=True),
                nn.Linear(pred_dim, dim),                          # (B, dim)
            )
            if MLP_mode == 'fixed_random_init':
                # N(0, 0.01): read as standard deviation 0.01 (variance 1e-4), the usual convention of
                # nn.init.normal_(w, 0, 0.01). The BN affine parameters keep their (1, 0) init; everything is then
                # frozen, so only the encoder learns (BN running statistics still update in train mode).
                for module in self.predictor:
                    if isinstance(module, nn.Linear):
                        nn.init.normal_(module.weight, mean=0.0, std=0.01)
                self.predictor[3].bias.data.zero_()
                for param in self.predictor.parameters():
                    param.requires_grad = False

        self.similarity = CosineSimilarity(dim=1)                  # no parameters: adds nothing to state_dict

    def forward(self, x1, x2):
        """Two views (B, C, H, W) -> (p1, p2, z1, z2), each (B, dim); z detached when self.stop_gradient."""
        z1 = self.encoder(x1)                                      # (B, dim)
        z2 = self.encoder(x2)                                      # (B, dim)
        p1 = self.predictor(z1)                                    # (B, dim)
        p2 = self.predictor(z2)                                    # (B, dim)
        if self.stop_gradient:
            # stopgrad(z) of the loss (Sec. 3): the targets are constants, so the encoder only learns through p (Sec. 4.1).
            return p1, p2, z1.detach(), z2.detach()
        return p1, p2, z1, z2

    def loss(self, p1, p2, z1, z2, similarity_function='CosineSimilarity'):
        """Symmetrised negative cosine similarity (Sec. 3): -1/2 (mean_b cos(p1, z2) + mean_b cos(p2, z1)).

        A scalar in [-1, 1]; -1 means every prediction points exactly along the other view's z.
        """
        if similarity_function != 'CosineSimilarity':
            raise ValueError(f"similarity_function must be 'CosineSimilarity', got {similarity_function!r}")
        return -0.5 * (self.similarity(p1, z2).mean() + self.similarity(p2, z1).mean())


@torch.no_grad()
def knn_predict(feature, feature_bank, feature_labels, classes, knn_k=200, knn_t=0.1):
    """Weighted kNN classifier (Wu et al., 2018, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", Sec. 3.4), the monitor of the SimSiam CIFAR demos, with the course notebook's contract.

    feature: (B, D) query features; feature_bank: (D, N), one COLUMN per training image (the notebook's layout);
        both ALREADY L2-normalised along D (nothing is normalised here, so products are cosine similarities).
    feature_labels: (N,) integer labels of the bank columns in [0, classes).
    Each query takes its k = min(knn_k, N) most similar bank columns; neighbour i votes for its class with weight
    exp(s_i / knn_t), s_i its cosine similarity (small knn_t: the nearest neighbours dominate).
    Returns (B, classes) long: the class indices sorted by total vote, best first (column 0 is the top-1
    prediction). Equal scores keep the smaller class index first (stable sort). Which of several bank columns with
    exactly the same similarity is kept at the k-th place is unspecified (torch.topk).
    """
    k = min(knn_k, feature_bank.shape[1])
    sim = feature @ feature_bank                                           # (B, N)
    sim_weight, sim_index = sim.topk(k=k, dim=-1)                          # (B, k)
    sim_labels = feature_labels.to(feature.device)[sim_index]             # (B, k)
    # exp((s_i - s_max) / knn_t): the votes exp(s_i / knn_t) scaled per query by exp(-s_max / knn_t), the same
    # ranking, without overflow to inf (and inf / inf = nan) for a small temperature
    sim_weight = ((sim_weight - sim_weight[:, :1]) / knn_t).exp()          # (B, k), topk's first is the largest
    one_hot = torch.zeros(sim_labels.shape + (classes,), device=feature.device, dtype=sim_weight.dtype)
    one_hot.scatter_(dim=-1, index=sim_labels.long().unsqueeze(-1), value=1.0)   # (B, k, classes)
    scores = (one_hot * sim_weight.unsqueeze(-1)).sum(dim=1)               # (B, classes)
    return scores.sort(dim=-1, descending=True, stable=True).indices      # (B, classes)


def cifar_resnet18(num_classes=1000, zero_init_residual=False, **kwargs):
    """ResNet-18 for 32x32 inputs: torchvision's resnet18 with the stem replaced by a 3x3 stride-1 convolution and
    no max-pool (the variant of the SimSiam paper's CIFAR experiments). ImageNet's 7x7 stride-2 conv + max-pool
    would shrink a 32x32 image to 8x8 before the first block and lose most spatial detail.

    Same keyword arguments as torchvision.models.resnet18, so `SimSiam(cifar_resnet18)` works; the classifier is
    still `.fc` (512 -> num_classes). Feature maps: 32x32 (layer1) -> 16 -> 8 -> 4 (layer4) -> pooled to (B, 512).
    """
    from torchvision.models import resnet18  # imported here: torchvision's import alone takes seconds

    model = resnet18(num_classes=num_classes, zero_init_residual=zero_init_residual, **kwargs)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init torchvision gives its own convolutions (the new layer would otherwise get PyTorch's default).
    nn.init.kaiming_normal_(model.conv1.weight, mode='fan_out', nonlinearity='relu')
    model.maxpool = nn.Identity()
    return model
