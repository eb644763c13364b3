"""Build random-weight CSM checkpoints that load exactly like the real one.

CSM-1B's weights cannot be downloaded everywhere (CI, air-gapped hosts), so the
CSM code path is exercised on random models of the same architecture.  A *tiny*
checkpoint (a few hundred thousand parameters, ~1 MB) is what the test suite
loads through ``--mode reuse --model-path``; ``size="full"`` keeps the default
``CsmConfig()`` shape (1.6 B parameters) for benchmarks.

Both carry their own processor: a byte-level BPE tokenizer with CSM's special
tokens, a 24 kHz ``EncodecFeatureExtractor`` and a chat template that renders
CSM-1B's prompt layout ``<bos>[speaker]text<eos>`` followed by
``<|AUDIO|><|audio_eos|>`` when the turn carries audio.

Run ``python -m tts_server.engines.tiny_csm OUT_DIR [--size tiny|full] [--seed N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..audio.pcm import OUTPUT_RATE

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
AUDIO, AUDIO_EOS = "<|AUDIO|>", "<|audio_eos|>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ bos_token }}[{{ message['role'] }}]"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{{ eos_token }}"
    "{%- for item in message['content'] if item['type'] == 'audio' -%}<|AUDIO|><|audio_eos|>{%- endfor -%}"
    "{%- endfor -%}"
)

_CORPUS = [
    "Hello there, how are you doing today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "It's a lovely morning; shall we walk along the river and talk about the weather?",
    "Numbers like 1, 2, 3 and 42 appear in text too: 3.14, 100%, and so on.",
]


def build_tokenizer(vocab_size: int = 400):
    """A small byte-level BPE tokenizer: any UTF-8 text encodes, ids stay few."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, AUDIO, AUDIO_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=AUDIO,
        extra_special_tokens={"audio_token": AUDIO, "audio_eos_token": AUDIO_EOS},
    )


def build_config(tokenizer, size: str = "tiny"):
    """A ``CsmConfig`` whose special ids match ``tokenizer``.

    The tiny shape keeps everything that matters for correctness: 32 codebooks,
    Mimi's 1920-sample hop (so the processor's frame count matches the codec)
    and a codebook vocabulary 3 ids larger than the codec's, as in CSM-1B.
    """
    from transformers import CsmConfig, CsmDepthDecoderConfig, MimiConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, AUDIO, AUDIO_EOS)}
    special = dict(
        bos_token_id=ids[BOS], pad_token_id=ids[AUDIO],
        audio_token_id=ids[AUDIO], audio_eos_token_id=ids[AUDIO_EOS],
    )
    if size == "full":
        return CsmConfig(text_vocab_size=max(len(tokenizer), 128256), **special)
    if size != "tiny":
        raise ValueError(f"unknown size {size!r} (tiny or full)")
    codec = MimiConfig(
        hidden_size=32, num_filters=8, codebook_size=64, codebook_dim=16,
        vector_quantization_hidden_dimension=16, num_quantizers=32, upsample_groups=32,
        num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16,
    )
    vocab = codec.codebook_size + 3  # like CSM-1B: 2048 codec ids + 3 special ids
    depth = CsmDepthDecoderConfig(
        num_codebooks=32, backbone_hidden_size=64, vocab_size=vocab, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )
    return CsmConfig(
        num_codebooks=32, vocab_size=vocab, text_vocab_size=len(tokenizer),
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        codebook_pad_token_id=vocab - 1,
        depth_decoder_config=depth.to_dict(), codec_config=codec.to_dict(), **special,
    )


def randomize_codebooks(codec) -> None:
    """Give Mimi's codebooks random centroids.

    A freshly built Mimi has all-zero codebooks, so every code decodes to the
    same audio and no test could tell one token sequence from another.
    """
    import torch

    with torch.no_grad():
        for name, buffer in codec.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.normal_()
    for module in codec.modules():
        if hasattr(module, "_embed"):
            module._embed = None


def build_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write model + processor into ``out_dir``; loadable fully offline."""
    import torch
    from transformers import (
        CsmForConditionalGeneration, CsmProcessor, EncodecFeatureExtractor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(build_config(tokenizer, size))
    randomize_codebooks(model.codec_model)
    model.generation_config.max_new_tokens = 64
    model.save_pretrained(out)
    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=OUTPUT_RATE)
    CsmProcessor(extractor, tokenizer, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_checkpoint(args.out_dir, args.size, args.seed))


if __name__ == "__main__":
    main()
