"""The model shapes the benchmarks build random checkpoints of (Hugging Face config dicts).

One place that every bench section imports, so that no two sections import each other.
"""

# TinyStories-33M (roneneldan/TinyStories-33M) shape
TINYSTORIES_33M = dict(model_type="gpt_neo", vocab_size=50257, max_position_embeddings=2048, hidden_size=768,
                       num_layers=4, num_heads=16, window_size=256, attention_types=[[["global", "local"], 2]],
                       intermediate_size=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                       embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=50256,
                       eos_token_id=50256)
# GPT-2 124M shape (openai-community/gpt2)
GPT2_124M = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=50256,
                 eos_token_id=50256)
