"""Small random-initialised HuggingFace ViTs and a plain reference: HF's own forward.

The reference prunes through HF's attention dispatch (``AttentionInterface``): a registered
attention function computes HF's eager attention and zeroes the pruned entries of one head's
post-softmax pattern. It reads z[l] with a forward hook on the layer's attention module and the
pooled embedding with a forward pre-hook on the classifier(s) (what the HF head reads).
"""
from __future__ import annotations

import contextlib

import torch

transformers = __import__("pytest").importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, initializer_range=0.15)
CONFIGS = {  # config class, kwargs
    "vit": ("ViTConfig", dict(SMALL, intermediate_size=64, image_size=32, patch_size=8)),
    "deit": ("DeiTConfig", dict(SMALL, intermediate_size=64, image_size=32, patch_size=8)),
    "dinov2": ("Dinov2Config", dict(SMALL, mlp_ratio=2, image_size=56, patch_size=14, layerscale_value=0.5)),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig",
                              dict(SMALL, mlp_ratio=2, image_size=56, patch_size=14, layerscale_value=0.5,
                                   num_register_tokens=4)),
}
ARCHS = {  # class -> config key
    "ViTModel": "vit", "ViTForImageClassification": "vit",
    "DeiTModel": "deit", "DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2", "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "dinov2_with_registers",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
}


def make_hf(arch: str, num_labels: int = 5, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random HF model of class ``arch`` with peaky attention (q/k weights scaled up)."""
    if not hasattr(transformers, arch):
        import pytest

        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    cfg_name, kwargs = CONFIGS[ARCHS[arch]]
    config = getattr(transformers, cfg_name)(**{**kwargs, **overrides}, num_labels=num_labels)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(3.0)  # peaky patterns
            if name.endswith(("cls_token", "distillation_token", "register_tokens")):
                p.normal_()
    return model


def prefix_tokens(model) -> int:
    cfg = model.config
    return {"deit": 2}.get(cfg.model_type, 1) + int(getattr(cfg, "num_register_tokens", 0) or 0)


_PRUNE: dict = {}  # the attention module to prune -> (head, keep mask [N, N])


def _pruning_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF's eager attention with one head's post-softmax entries zeroed where the keep mask is 0."""
    weights = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * scaling, dim=-1)
    if module in _PRUNE:
        head, keep = _PRUNE[module]
        weights = weights.clone()
        weights[:, head] = weights[:, head] * keep
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


transformers.AttentionInterface.register("headscope_test_prune", _pruning_attention)


def layers_of(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


@contextlib.contextmanager
def pruned(model, layer: int | None = None, head: int = 0, keep: torch.Tensor | None = None):
    """Run ``model`` with (layer, head)'s post-softmax attention multiplied by ``keep`` [N, N]."""
    model.set_attn_implementation("headscope_test_prune")
    if layer is not None:
        _PRUNE[layers_of(model)[layer].attention] = (head, keep)
    try:
        yield model
    finally:
        _PRUNE.clear()
        model.set_attn_implementation("eager")


def hf_reference(model, images, layer: int, head: int = 0, keep: torch.Tensor | None = None):
    """One HF forward with (layer, head) pruned by ``keep`` (None: unpruned):
    (logits [B, C] or None, pooled [B, D], z_l [B, N, C])."""
    store = {}
    heads = [getattr(model, n) for n in ("classifier", "cls_classifier", "distillation_classifier")
             if isinstance(getattr(model, n, None), torch.nn.Linear)]
    handles = [layers_of(model)[layer].attention.register_forward_hook(
        lambda m, i, o: store.__setitem__("z", o[0].detach().clone()))]
    handles += [h.register_forward_pre_hook(lambda m, i: store.setdefault("pooled", []).append(i[0].detach()))
                for h in heads]
    try:
        with torch.no_grad(), pruned(model, None if keep is None else layer, head, keep):
            out = model(images)
    finally:
        for h in handles:
            h.remove()
    if heads:
        pooled = sum(store["pooled"]) / len(store["pooled"])  # DeiT with teacher: mean of CLS and DIST
        return out.logits, pooled, store["z"]
    return None, out.last_hidden_state[:, 0], store["z"]


def save_hf(model, folder, preprocessor: dict | None = None):
    """save_pretrained into ``folder`` (safetensors), plus a preprocessor_config.json when given."""
    import json
    from pathlib import Path

    model.save_pretrained(str(folder))
    if preprocessor is not None:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return str(folder)
