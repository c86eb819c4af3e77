"""HF parity for the mixture-of-experts families, both directions: Mixtral (every layer a MoE, sliding
window, renormalized top-k) and Qwen2-MoE (shared expert with a sigmoid gate, qkv bias, dense layers
through ``mlp_only_layers`` / ``decoder_sparse_step``, per-layer sliding windows). Tiny random configs in
fp32, batch > 1 with left padding and position_ids, logits within 1e-4; the load-balancing loss and the
total loss equal HF's (``output_router_logits=True``) with and without padding."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_model_hf import V, batch, compare, export_and_compare, perturbed  # noqa: E402

from lmforge.model.config import preset  # noqa: E402
from lmforge.model.hf import check_exportable, import_hf  # noqa: E402

COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts_per_tok=2)
HF_CASES = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                                  sliding_window=5, router_aux_loss_coef=0.02),
    "mixtral-relu": lambda: transformers.MixtralConfig(**{**COMMON, "num_hidden_layers": 2}, intermediate_size=48,
                                                       num_local_experts=3, hidden_act="relu"),
    # one dense layer (mlp_only_layers), no top-k renormalization
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=80, num_experts=4,
                                                     mlp_only_layers=[1], norm_topk_prob=False,
                                                     router_aux_loss_coef=0.05),
    # MoE every second layer, renormalized top-k, sliding windows on layers 0 and 2 (transformers' rule)
    "qwen2_moe-sparse-step": lambda: transformers.Qwen2MoeConfig(
        **{**COMMON, "num_hidden_layers": 4}, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=5, decoder_sparse_step=2, norm_topk_prob=True,
        use_sliding_window=True, sliding_window=4, max_window_layers=3),
}


def hf_moe(name):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(HF_CASES[name](), attn_implementation="eager").eval()
    with torch.no_grad():  # every parameter counts: norms off 1, biases off 0, experts and routers perturbed
        for pname, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.1 * torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))
    if name == "mixtral-relu":  # ReLU² experts: w1 = w3
        with torch.no_grad():
            for layer in m.model.layers:
                gu = layer.mlp.experts.gate_up_proj
                gate, _ = gu.chunk(2, dim=1)
                gu.copy_(torch.cat([gate, gate], dim=1))
    return m


@pytest.mark.parametrize("name", list(HF_CASES))
def test_import_hf_moe_matches(name, tmp_path):
    hf = hf_moe(name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = import_hf(tmp_path)
    ours.eval()
    arch = name.split("-")[0]
    cfg = ours.cfg
    assert cfg.hf_family == arch and cfg.moe is not None
    assert cfg.moe.aux_loss_coef == pytest.approx(hf.config.router_aux_loss_coef)
    dense = [s.index for s in cfg.layer_specs() if s.ffn == "dense"]
    assert dense == {"qwen2_moe": [1], "qwen2_moe-sparse-step": [0, 2]}.get(name, [])
    if name == "mixtral-relu":
        assert cfg.moe.activation == "relu2"
    if name == "qwen2_moe-sparse-step":
        assert cfg.moe_layers == "every:2" and [s.window for s in cfg.layer_specs()] == [4, None, 4, None]
    err, err2 = compare(ours, hf, *batch())
    assert err < 1e-4 and err2 < 1e-4, (err, err2)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_import_reads_the_fused_expert_names_too(name, tmp_path):
    """transformers 5.x holds the experts fused (``mlp.experts.gate_up_proj``); a file with those names
    imports like one with the per-expert names ``save_pretrained`` writes."""
    from safetensors.torch import save_file

    hf = hf_moe(name)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours, _ = import_hf(tmp_path)
    err, err2 = compare(ours.eval(), hf, *batch())
    assert err < 1e-4 and err2 < 1e-4, (err, err2)


EXPORT_CASES = {
    "tiny-mixtral": ("tiny-mixtral", {}),
    "mixtral-window-relu2": ("tiny-mixtral", dict(sliding_window=5, mlp="relu2",
                                                  moe=dict(n_experts=3, top_k=1, activation="relu2"))),
    "tiny-qwen2-moe": ("tiny-qwen2-moe", {}),
    "qwen2-moe-every-2-windows": ("tiny-qwen2-moe", dict(n_layer=4, moe_layers="every:2", sliding_window=4,
                                                         window_layers=[0, 3], moe=dict(norm_topk_prob=True))),
    "qwen2-moe-list-no-qkv-bias": ("tiny-qwen2-moe", dict(n_layer=3, moe_layers=[0, 2], qkv_bias=False,
                                                          d_ff=80, moe=dict(aux_loss_coef=0.1))),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_moe_to_hf_matches(name, tmp_path):
    base, kw = EXPORT_CASES[name]
    cfg = preset(base, vocab_size=V, **kw)
    conf = export_and_compare(perturbed(cfg), tmp_path)
    from safetensors.torch import load_file

    t = load_file(tmp_path / "model.safetensors")
    assert conf["router_aux_loss_coef"] == cfg.moe.aux_loss_coef
    if cfg.hf_family == "mixtral":
        assert conf["num_local_experts"] == cfg.moe.n_experts and conf["intermediate_size"] == cfg.d_expert
        w1, w3 = (t[f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"] for w in ("w1", "w3"))
        assert torch.equal(w1, w3) == (cfg.moe.activation == "relu2")
    else:
        assert conf["shared_expert_intermediate_size"] == cfg.moe.n_shared * cfg.moe.d_shared
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in t or conf["mlp_only_layers"] or \
            conf["decoder_sparse_step"] > 1
    if name == "qwen2-moe-every-2-windows":
        assert conf["decoder_sparse_step"] == 2 and conf["mlp_only_layers"] == []
        assert conf["layer_types"] == ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    if name == "qwen2-moe-list-no-qkv-bias":
        assert conf["mlp_only_layers"] == [1] and conf["intermediate_size"] == 80
        assert not t["model.layers.0.self_attn.q_proj.bias"].any()  # written as zeros, read back as none


def _labels_and_targets(ids, mask):
    labels = ids.clone()
    if mask is not None:  # no loss at padding, nor from it (a padded query's logits differ: it sees no key)
        labels[mask == 0] = -100
        labels[:, 1:][mask[:, :-1] == 0] = -100
    # HF shifts inside its loss (logits[:, :-1] against labels[:, 1:]); lmforge takes shifted targets
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return labels, targets


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen2_moe-sparse-step"])
@pytest.mark.parametrize("padded", [False, True])
def test_aux_loss_matches_hf(name, padded, tmp_path):
    hf = hf_moe(name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = import_hf(tmp_path)
    ours.eval()
    ids, mask, pos = batch()
    if not padded:
        mask = pos = None
    labels, targets = _labels_and_targets(ids, mask)
    coef = hf.config.router_aux_loss_coef
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, output_router_logits=True)
        _, loss = ours(ids, targets=targets, attention_mask=mask, position_ids=pos)
    rm = ours.router_metrics
    assert out.aux_loss is not None and float(out.aux_loss) > 0
    assert abs(float(out.aux_loss) - float(rm["aux_loss"])) < 1e-5, (out.aux_loss, rm["aux_loss"])
    assert abs(float(out.loss - coef * out.aux_loss) - float(rm["ce"])) < 1e-5
    assert abs(float(out.loss) - float(loss)) < 1e-5, (out.loss, loss)


@pytest.mark.parametrize("base,kw,arch,msg", [
    ("tiny-mixtral", {}, "llama", "ModelConfig.moe must be None"),
    ("tiny-qwen2-moe", {}, "mistral", "ModelConfig.moe must be None"),
    ("tiny-mixtral", dict(moe_layers=[1]), "mixtral", "moe_layers must be 'all'"),
    ("tiny-mixtral", dict(sliding_window=4, window_layers=[0]), "mixtral", "window_layers must be 'all'"),
    ("tiny-mixtral", {}, "qwen2_moe", "moe.n_shared must be >= 1"),
    ("tiny-qwen2-moe", dict(qkv_bias=False), "mixtral", "moe.norm_topk_prob must be True"),
    ("tiny-qwen2-moe", dict(moe=dict(shared_gate=False)), "qwen2_moe", "moe.shared_gate must be True"),
    ("tiny-qwen2-moe", dict(moe_layers=[1], moe=dict(activation="relu2")), "qwen2_moe",
     "ffn.activation must be moe.activation"),
    ("tiny-qwen2-moe", dict(out_bias=True), "qwen2_moe", "attn.out_bias must be False"),
])
def test_check_exportable_moe_names_the_field(base, kw, arch, msg):
    with pytest.raises(ValueError, match=msg):
        check_exportable(preset(base, **kw), arch)


def test_z_loss_is_training_only(tmp_path):
    """No HF family has a router z-loss: it exports (the logits do not depend on it) and imports as 0."""
    m = perturbed(preset("tiny-mixtral", vocab_size=V, moe=dict(z_loss_coef=1e-3)))
    from lmforge.model.hf import export_hf

    export_hf(m, tmp_path)
    assert "z_loss" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    back, _ = import_hf(tmp_path)
    assert back.cfg.moe.z_loss_coef == 0.0
    ids = batch()[0]
    with torch.no_grad():
        assert torch.equal(m(ids), back.eval()(ids))
