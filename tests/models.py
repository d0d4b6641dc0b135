"""Tiny random Hugging Face models of many architectures, built from configs (no downloads)."""

import torch
import transformers as tf

V = 96  # vocabulary
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=0)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, **COMMON)

# name -> (config, model class, is generative decoder, is encoder-decoder)
ARCHS = {
    "llama": (lambda: tf.LlamaConfig(**LLAMA_LIKE), tf.LlamaForCausalLM),
    "qwen2": (lambda: tf.Qwen2Config(**LLAMA_LIKE), tf.Qwen2ForCausalLM),
    "gemma2": (lambda: tf.Gemma2Config(head_dim=8, **LLAMA_LIKE), tf.Gemma2ForCausalLM),
    "mistral": (lambda: tf.MistralConfig(**LLAMA_LIKE), tf.MistralForCausalLM),
    "gpt2": (lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, **COMMON), tf.GPT2LMHeadModel),
    "gpt_neox": (lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, **COMMON), tf.GPTNeoXForCausalLM),
    "opt": (lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 word_embed_proj_dim=32, **COMMON), tf.OPTForCausalLM),
    "falcon": (lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       **COMMON), tf.FalconForCausalLM),
    "bloom": (lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **COMMON), tf.BloomForCausalLM),
    "bert": (lambda: tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=V, pad_token_id=0), tf.BertForMaskedLM),
    "t5": (lambda: tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                               decoder_start_token_id=0, **COMMON), tf.T5ForConditionalGeneration),
}
GENERATIVE = {"llama", "qwen2", "gemma2", "mistral", "gpt2", "gpt_neox", "opt", "falcon", "bloom", "t5"}


def build(name: str, seed: int = 0, layers: int | None = None):
    """The tiny model ``name`` (2 blocks per stack, or ``layers``), seeded, in eval mode."""
    config_fn, cls = ARCHS[name]
    config = config_fn()
    if layers is not None:
        config.num_hidden_layers = layers  # aliased to n_layer / num_layers where named so
        if getattr(config, "num_decoder_layers", None):
            config.num_decoder_layers = layers
        if getattr(config, "layer_types", None):  # alternating sliding / full attention
            config.layer_types = [config.layer_types[i % 2] for i in range(layers)]
    torch.manual_seed(seed)
    return cls(config).eval()


def inputs(name: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (2, 7), generator=g)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, V, (2, 5), generator=g)}
    return {"input_ids": ids}


def calibration(seed: int = 5, batches: int = 2) -> list:
    """Token-id batches ``(4, 32)`` for calibrated compression of the tiny models."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (4, 32), generator=g) for _ in range(batches)]


def with_labels(name: str, batch: dict) -> dict:
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    return {**batch, "labels": labels}


def char_tokenizer():
    """A character-level fast tokenizer with ids inside the tiny models' vocabulary (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-\n()"
    vocab = {"<s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars[: V - 2])}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", unk_token="<unk>",
                                      pad_token="<s>")


#: Tokenizer conventions for the start of a text, as :func:`convention_tokenizer` builds them:
#: (special tokens in id order, the token the tokenizer prepends itself or None, bos_token,
#: the start token a window must begin with).
CONVENTIONS = {
    # GPT-2 / SmolLM2 base: documents joined by <|endoftext|> (id 0), nothing prepended.
    "bos0": (["<|endoftext|>", "<unk>"], None, "<|endoftext|>", 0),
    # Gemma: <pad> is 0, the tokenizer prepends <bos> (2) itself.
    "bos2_pad0": (["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>", "<bos>", 2),
    # A family without a start token.
    "none": (["<eos>", "<unk>"], None, None, None),
    # SmolLM2-Instruct: bos_token <|im_start|> is a chat turn marker; text starts after 0.
    "chat": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"], None, "<|im_start|>", 0),
}


def convention_tokenizer(name: str):
    """A character-level fast tokenizer (ids inside the tiny models' vocabulary) with the
    special tokens and start-of-text habit of :data:`CONVENTIONS`\\ ``[name]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials, prepended, bos, _ = CONVENTIONS[name]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-\n()"
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({c: i + len(specials) for i, c in enumerate(chars[: V - len(specials)])})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if prepended is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{prepended} $A", special_tokens=[(prepended, vocab[prepended])])
    eos = next(t for t in specials if t in ("<eos>", "<|im_end|>", "<|endoftext|>"))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos,
                                     unk_token="<unk>", pad_token=specials[0])
    if name == "chat":
        tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                             "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    return tok


def convention_model(name: str):
    """The tiny LLaMA with a config that agrees with :func:`convention_tokenizer` (``name``)."""
    tok = convention_tokenizer(name)
    config = tf.LlamaConfig(**{**LLAMA_LIKE, "bos_token_id": tok.bos_token_id,
                               "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def silence_heads(model, heads=(1, 3), blocks=None):
    """Zero the ``o_proj`` columns of query ``heads`` in every block (or the indices ``blocks``)
    of a tiny LLaMA-like model (4 query heads in 2 key/value groups): those heads then
    contribute nothing, and the budget drops them first (``tensornet_llm.compress.heads``).
    Returns ``model``."""
    layers = model.model.layers
    with torch.no_grad():
        for layer in layers if blocks is None else [layers[i] for i in blocks]:
            attn = layer.self_attn
            for head in heads:
                attn.o_proj.weight[:, head * attn.head_dim:(head + 1) * attn.head_dim] = 0
    return model
