"""A word-level Hugging Face tokenizer over the tiny decoders' 97-token vocabulary (built with `tokenizers`, no
files), so label-word readouts and completions run on tiny random models: <pad> 0, <s> 1 (prepended to every
text), </s> 2, <unk> 3, then the words."""
import numpy as np

from jaxlin import data
from jaxlin.models import Tokenizer

WORDS = ("Review", ":", "Sentiment", "good", "bad", "great", "awful", "fine", "poor", "the", "a", "movie", "plot",
         "was", "very", "and")


def word_tokenizer(vocab_size: int = 97) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<s>", "</s>", "<unk>", *WORDS]
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    return Tokenizer(hf)


def sentiment_data(n: int, seed: int) -> data.TextDataset:
    """Texts of 2–5 words; label 1 when it holds more positive than negative words (ties negative)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        words = rng.choice(WORDS[3:], size=rng.integers(2, 6))
        texts.append(" ".join(words))
        labels.append(int(sum(w in ("good", "great", "fine") for w in words) >
                          sum(w in ("bad", "awful", "poor") for w in words)))
    return data.TextDataset(tuple(texts), np.array(labels), ("negative", "positive"), name=f"words{seed}",
                            source="memory")
