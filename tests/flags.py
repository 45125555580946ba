"""Flags shared by tests that describe a model with Megatron's size flags (and so by Megatron's rules)."""

# What Megatron needs to be told to build this project's architecture (its defaults are LayerNorm, GeLU,
# learned positions, biases, multi-head attention and dropout 0.1).
LLAMA_ARCHITECTURE = ["--group-query-attention", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type",
                      "rope", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0"]
