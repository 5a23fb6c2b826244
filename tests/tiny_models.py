"""Tiny random transformers models built from configs with a fixed seed and saved like a
downloaded checkpoint (no hub access). NOT pretrained: they exercise the real code paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

WORDS = ["handle", "spout", "blade", "rim", "mug", "the", "a", "of", "knife", "cup", "lid"]


def clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer over a hand-written vocabulary: every word merges to one token."""
    # Id 0 must not be the start token: OWL treats a query whose first id is 0 as padding.
    vocab: dict[str, int] = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for ch in sorted(set("".join(WORDS))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


def build_owlv2(path: Path) -> None:
    tokenizer = clip_tokenizer()
    text = transformers.Owlv2TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
        pad_token_id=2)
    vision = transformers.Owlv2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=64, patch_size=16)
    # projection_dim must equal the text hidden size (ENVIRONMENT.md).
    config = transformers.Owlv2Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                      projection_dim=32)
    torch.manual_seed(0)
    transformers.Owlv2ForObjectDetection(config).save_pretrained(path)
    image_processor = transformers.Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    transformers.Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def build_grounding_dino(path: Path) -> None:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + WORDS)}
    tokenizer = transformers.BertTokenizer(vocab=vocab)
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
                                   num_heads=[1, 1], window_size=4, out_features=["stage1", "stage2"])
    bert = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=64)
    config = transformers.GroundingDinoConfig(
        backbone_config=swin.to_dict(), text_config=bert.to_dict(), d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_queries=10, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32, use_timm_backbone=False)
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(path)
    image_processor = transformers.GroundingDinoImageProcessorPil(
        size={"shortest_edge": 48, "longest_edge": 80})
    transformers.GroundingDinoProcessor(image_processor=image_processor,
                                        tokenizer=tokenizer).save_pretrained(path)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_llava(path: Path) -> None:
    """Tiny LLaVA (CLIP vision tower + Llama decoder). Qwen2-VL's processor insists on a video
    processor, which transformers 5.23 cannot build without torchvision (not installed)."""
    from tokenizers.pre_tokenizers import ByteLevel
    # Byte-level BPE with no merges: one token per byte, so any text round-trips.
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                         crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8,
                                           projection_dim=32)
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=256, eos_token_id=eos, pad_token_id=eos,
                                    bos_token_id=None)
    config = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                      image_token_index=image_token, image_seq_length=16,
                                      vision_feature_layer=-1)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


