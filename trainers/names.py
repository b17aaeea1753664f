"""Names a spec may use, as data: the service validates specs with them without torch or timm installed.

The lists mirror timm 1.0.31 (the version pyproject pins); `tests/trainers/test_names.py` fails
when the installed timm disagrees, so they cannot drift silently.
"""

from __future__ import annotations

import difflib

CONVNEXTV2_MODELS: tuple[str, ...] = (
    'convnextv2_atto', 'convnextv2_base', 'convnextv2_femto', 'convnextv2_huge', 'convnextv2_large',
    'convnextv2_nano', 'convnextv2_pico', 'convnextv2_small', 'convnextv2_tiny'
)
# timm pretrained tags (``model.tag``) of those models
CONVNEXTV2_PRETRAINED: tuple[str, ...] = (
    'convnextv2_atto.fcmae', 'convnextv2_atto.fcmae_ft_in1k', 'convnextv2_base.fcmae',
    'convnextv2_base.fcmae_ft_in1k', 'convnextv2_base.fcmae_ft_in22k_in1k',
    'convnextv2_base.fcmae_ft_in22k_in1k_384', 'convnextv2_femto.fcmae',
    'convnextv2_femto.fcmae_ft_in1k', 'convnextv2_huge.fcmae', 'convnextv2_huge.fcmae_ft_in1k',
    'convnextv2_huge.fcmae_ft_in22k_in1k_384', 'convnextv2_huge.fcmae_ft_in22k_in1k_512',
    'convnextv2_large.fcmae', 'convnextv2_large.fcmae_ft_in1k', 'convnextv2_large.fcmae_ft_in22k_in1k',
    'convnextv2_large.fcmae_ft_in22k_in1k_384', 'convnextv2_nano.fcmae',
    'convnextv2_nano.fcmae_ft_in1k', 'convnextv2_nano.fcmae_ft_in22k_in1k',
    'convnextv2_nano.fcmae_ft_in22k_in1k_384', 'convnextv2_pico.fcmae', 'convnextv2_pico.fcmae_ft_in1k',
    'convnextv2_tiny.fcmae', 'convnextv2_tiny.fcmae_ft_in1k', 'convnextv2_tiny.fcmae_ft_in22k_in1k',
    'convnextv2_tiny.fcmae_ft_in22k_in1k_384'
)
OPTIMIZER_NAMES: tuple[str, ...] = (
    'adabelief', 'adadelta', 'adafactor', 'adafactorbv', 'adafactorbvc', 'adagrad', 'adahessian',
    'adam', 'adamax', 'adamc', 'adamp', 'adamuon', 'adamw', 'adamwlegacy', 'adan', 'adanw', 'adopt',
    'adoptc', 'adoptw', 'bnbadam', 'bnbadam8bit', 'bnbadamw', 'bnbadamw8bit', 'bnbademamix',
    'bnbademamix8bit', 'bnblion', 'bnblion8bit', 'bnbsgd', 'bnbsgd8bit', 'cadafactor', 'cadafactorbv',
    'cadafactorbvc', 'cadamc', 'cadamp', 'cadamw', 'cadan', 'cadanw', 'cadopt', 'cadoptc', 'cadoptw',
    'clamb', 'clambw', 'claprop', 'clion', 'clionc', 'cmars', 'cnadamc', 'cnadamw', 'crmsproptf',
    'csgdc', 'csgdp', 'csgdw', 'fusedadam', 'fusedadamw', 'fusedlamb', 'fusednovograd', 'fusedsgd',
    'kron', 'kronc', 'kronw', 'lamb', 'lambc', 'lambcd', 'lambcw', 'lambw', 'laprop', 'lapropc', 'larc',
    'lars', 'lion', 'lionc', 'madgrad', 'madgradw', 'mars', 'momentum', 'muon', 'nadam', 'nadamc',
    'nadamlegacy', 'nadamuon', 'nadamw', 'nesterov', 'nesterovw', 'nlarc', 'nlars', 'nmuon', 'novograd',
    'novogradc', 'novogradw', 'radabelief', 'radam', 'radamlegacy', 'radamw', 'rmsprop', 'rmsproptf',
    'rmsproptfc', 'rmsproptfw', 'sgd', 'sgdc', 'sgdp', 'sgdw'
)
OPTIMIZER_WRAPPERS = ("lookahead",)


def check_model_name(name: str) -> str:
    """``name`` if it is a timm ConvNeXtV2 (optionally ``.tag``), else a ValueError listing the valid ones."""
    base, _, tag = name.partition(".")
    if not base.startswith("convnextv2_"):
        raise ValueError(f"must be a timm convnextv2_* model, got {name!r}; e.g. convnextv2_tiny")
    if base not in CONVNEXTV2_MODELS:
        close = difflib.get_close_matches(base, CONVNEXTV2_MODELS, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {base!r}; choose one of {', '.join(CONVNEXTV2_MODELS)}.{hint}")
    if tag and name not in CONVNEXTV2_PRETRAINED:
        tags = [p.partition(".")[2] for p in CONVNEXTV2_PRETRAINED if p.startswith(base + ".")]
        raise ValueError(f"unknown pretrained tag {tag!r} for {base}; available: {', '.join(tags) or 'none'}")
    return name


def check_optimizer_name(name: str) -> str:
    """The lower-cased name if timm has it (an optional ``lookahead_`` prefix allowed), else a ValueError."""
    lowered = name.lower()
    *wrappers, base = lowered.split("_")
    if base not in OPTIMIZER_NAMES or len(wrappers) > 1 or any(w not in OPTIMIZER_WRAPPERS for w in wrappers):
        close = difflib.get_close_matches(base, OPTIMIZER_NAMES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown optimizer {name!r}.{hint} Valid names: {', '.join(OPTIMIZER_NAMES)}; "
            "any of them may take the prefix 'lookahead_' (e.g. 'lookahead_adamw')."
        )
    return lowered
