"""Problem 3 companion helpers (the course's `q3_misc.py`): the two-view transform and checkpoint loading for SimSiam
(Chen & He, 2021). Self-contained: standard library and torch only.

Checkpoint format (the official SimSiam `main_simsiam.py` one): a dict with
    'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
    'epoch': the number of epochs completed, i.e. the epoch to start from when resuming.
A 'module.' prefix (from DataParallel / DistributedDataParallel) on the state-dict keys is removed when the model
being loaded into has no such prefix.
"""
import os

import torch


class TwoCropsTransform:
    """Two independent draws of a random augmentation of one image: x -> [q, k] (the two views of SimSiam)."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        q = self.base_transform(x)
        k = self.base_transform(x)
        return [q, k]

    def __repr__(self):
        return f'{type(self).__name__}({self.base_transform!r})'


def _map_location(gpu):
    """Where load_checkpoints puts the tensors. The template builds 'cuda:{gpu}', which only works for an int; the
    notebook passes its `device` (a torch.device or a string), so every form is accepted:
    None -> the CPU (a checkpoint written on a GPU box also loads on a CPU-only machine); an int or a digit string
    -> that GPU; any other string or a torch.device -> that device ('cpu', 'cuda', 'cuda:1')."""
    if gpu is None:
        return torch.device('cpu')
    if isinstance(gpu, bool):
        raise TypeError(f'gpu must be None, an int, a device string or a torch.device, got {gpu!r}')
    if isinstance(gpu, int) or (isinstance(gpu, str) and gpu.isdigit()):
        return torch.device('cuda', int(gpu))
    if isinstance(gpu, (str, torch.device)):
        return torch.device(gpu)
    raise TypeError(f'gpu must be None, an int, a device string or a torch.device, got {gpu!r}')


def _match_module_prefix(state_dict, model):
    """Drop a 'module.' key prefix (saved from a DataParallel/DDP wrapper) when `model` is not wrapped."""
    model_keys = model.state_dict().keys()
    wrapped = any(k.startswith('module.') for k in model_keys)
    if not wrapped and state_dict and all(k.startswith('module.') for k in state_dict):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def load_checkpoints(resume, model, optimizer, gpu):
    """Resume training from the checkpoint file `resume`: -> (model, optimizer, start_epoch).

    Restores the model's and the optimizer's state in place (strict: the architecture must match) and returns the
    saved 'epoch' as start_epoch. When `resume` is not a file, prints "=> no checkpoint found at '...'" and returns
    the inputs unchanged with start_epoch 0 (a fresh start). gpu: where the tensors are loaded (see _map_location:
    None, an int, a string or a torch.device).
    Loads with weights_only=True: tensors and plain containers only, no arbitrary pickled objects.
    """
    if not os.path.isfile(resume):
        print(f"=> no checkpoint found at '{resume}', starting from epoch 0")
        return model, optimizer, 0
    print(f"=> loading checkpoint '{resume}'")
    checkpoint = torch.load(resume, map_location=_map_location(gpu), weights_only=True)
    missing = [key for key in ('state_dict', 'optimizer', 'epoch') if key not in checkpoint]
    if missing:
        raise KeyError(f"checkpoint '{resume}' lacks {missing}; expected keys 'state_dict', 'optimizer', 'epoch'")
    model.load_state_dict(_match_module_prefix(checkpoint['state_dict'], model))
    optimizer.load_state_dict(checkpoint['optimizer'])
    start_epoch = int(checkpoint['epoch'])
    print(f"=> loaded checkpoint '{resume}' (epoch {start_epoch})")
    return model, optimizer, start_epoch


def load_pretrained_checkpoints(pretrained, model, optimizer, gpu):
    """Initialise `model` from the encoder of a pre-trained SimSiam checkpoint: -> (model, optimizer, 0), the
    template's return (the notebook's linear-evaluation cell unpacks `model, optimizer, start_epoch`).

    The source is checkpoint['state_dict'] (or the file's dict itself when it has no 'state_dict' key), 'module.'
    prefixes removed. Its entries named 'encoder.*' are the SimSiam encoder (backbone + projector); the
    predictor is never loaded. They go
      * into `model.encoder` (prefix stripped) when `model` has an `.encoder` (e.g. another SimSiam), or
      * into `model` itself (prefix stripped) otherwise, e.g. a bare backbone for linear evaluation;
    when the source has no 'encoder.*' entries it is taken as a bare backbone state dict. Only entries whose name
    AND shape match the target are copied (strict=False), so a differently sized classifier head `fc.*` is simply
    left as initialised; the count of copied and skipped tensors is printed. The optimizer is returned untouched
    (pre-training's optimizer state does not belong to a new optimisation), and the start epoch is 0. As in the
    template the file is read onto the CPU whatever `gpu` is (load_state_dict copies onto the model's device);
    `gpu` is accepted for the template's signature.
    Raises FileNotFoundError when the file is missing (a silent fall-back to random weights would make a linear
    evaluation meaningless) and ValueError when nothing matches.
    """
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f"=> no pre-trained checkpoint found at '{pretrained}'")
    print(f"=> loading pre-trained checkpoint '{pretrained}'")
    checkpoint = torch.load(pretrained, map_location='cpu', weights_only=True)
    source = checkpoint.get('state_dict', checkpoint)
    if source and all(k.startswith('module.') for k in source):
        source = {k[len('module.'):]: v for k, v in source.items()}

    encoder_part = {k[len('encoder.'):]: v for k, v in source.items() if k.startswith('encoder.')}
    if not encoder_part:
        encoder_part = dict(source)                                # a bare backbone checkpoint
    target = model.encoder if hasattr(model, 'encoder') else model

    own = target.state_dict()
    usable = {k: v for k, v in encoder_part.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"no tensor of '{pretrained}' matches the model's names and shapes")
    target.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    print(f"=> loaded {len(usable)}/{len(own)} tensors from '{pretrained}'"
          + (f"; kept as initialised: {skipped}" if skipped else ''))
    return model, optimizer, 0
