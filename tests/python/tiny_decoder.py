"""The decoder the reference scripts compare against: a full transformers model's weights cut to
its first residual and MLP channels, attention heads untouched (the shape calibrate-prune
produces). Shared by train_ref.py and two_stage_ref.py; the Rust tests' reference caches hash this
file together with each script (model/tests/common `cached_script_output`)."""


def slice_decoder(full, config_cls, model_cls, kwargs, hidden, intermediate):
    """`full` cut to the first `hidden` residual and `intermediate` MLP channels."""
    config = config_cls(**dict(kwargs, hidden_size=hidden, intermediate_size=intermediate))
    decoder = model_cls(config).eval()
    d, i = hidden, intermediate
    state = {}
    for key, w in full.state_dict().items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            w = w[:, :d]
        elif key.endswith("norm.weight"):
            w = w[:d]
        elif key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            w = w[:, :d]
        elif key.endswith("o_proj.weight"):
            w = w[:d, :]
        elif key.endswith(("gate_proj.weight", "up_proj.weight")):
            w = w[:i, :d]
        elif key.endswith("down_proj.weight"):
            w = w[:d, :i]
        state[key] = w.clone()
    decoder.load_state_dict(state, strict=True)
    return decoder
