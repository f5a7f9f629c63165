"""The static-embedding student: a table of token vectors, mean-pooled over the text, and a small head.

No attention and no layers: a text costs a table lookup per word piece and one small matrix product, so it serves
far faster than any transformer student. The table starts the way model2vec makes its static models: every
vocabulary piece is passed alone through a sentence encoder (a packaged base model, or the fine-tuned teacher's own
encoder), the outputs are reduced by PCA to ``hidden_size`` dimensions and weighted by how often the piece occurs
(smooth inverse frequency: ``a / (a + p(piece))``, here with ``p`` counted on the in-domain texts rather than guessed
from the piece's rank). Then the whole model is trained by the same KD objective as every other student.

It is a transformers ``PreTrainedModel`` registered with the Auto classes in this process (no remote code, no
``auto_map``): saved, loaded, pruned, exported to ONNX and measured like any other classifier folder. Served, it is
an ONNX file (``student.deploy: onnx-int8``): the registered loader needs nothing of this module.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from distillery.models.folders import ModelError
from distillery.models.losses import mean_pool
from distillery.models.vocabulary import piece_ids

MODEL_TYPE = "distillery-static"
SIF_COEFFICIENT = 1e-4  # model2vec's default smooth-inverse-frequency coefficient


class StaticConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 30522, hidden_size: int = 256, head_size: int = 256,
                 classifier_dropout: float = 0.1, pad_token_id: int = 0, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.hidden_size, self.head_size = vocab_size, hidden_size, head_size
        self.classifier_dropout = classifier_dropout


class StaticEmbeddingClassifier(PreTrainedModel):
    """``logits = head(mean of the token vectors of the text)`` (padding excluded: a text's answer does not depend
    on the batch it is padded in). ``output_hidden_states`` gives the pooled vector as the one hidden state."""

    config_class = StaticConfig
    base_model_prefix = "static"
    main_input_name = "input_ids"

    def __init__(self, config: StaticConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout), nn.Linear(config.hidden_size, config.head_size), nn.GELU(),
            nn.Dropout(config.classifier_dropout), nn.Linear(config.head_size, config.num_labels))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The mean of the text's token vectors (batch, hidden_size)."""
        mask = (input_ids != self.config.pad_token_id) if attention_mask is None else attention_mask
        return mean_pool(self.embeddings(input_ids), mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                output_hidden_states: bool | None = None, **_: object) -> SequenceClassifierOutput:
        pooled = self.pooled(input_ids, attention_mask)
        logits = self.classifier(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=(pooled.unsqueeze(1),) if output_hidden_states else None)


AutoConfig.register(MODEL_TYPE, StaticConfig, exist_ok=True)
AutoModelForSequenceClassification.register(StaticConfig, StaticEmbeddingClassifier, exist_ok=True)


def piece_vectors(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 512) -> np.ndarray:
    """Each vocabulary piece passed alone through ``encoder`` (a transformers classifier or bare encoder: its
    ``base_model``), as the tokenizer frames a text (``[CLS] piece [SEP]``), mean-pooled: (vocab size, encoder
    width), float32."""
    base = encoder.base_model.eval()
    ids = list(range(len(tokenizer)))
    first = [t for t in (tokenizer.cls_token_id,) if t is not None]
    last = [t for t in (tokenizer.sep_token_id,) if t is not None]
    framed = [first + [i] + last for i in ids]
    width = max(len(f) for f in framed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    with torch.inference_mode():
        for start in range(0, len(framed), batch_size):
            rows = framed[start:start + batch_size]
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            hidden = base(input_ids=input_ids, attention_mask=mask).last_hidden_state
            out.append(mean_pool(hidden, mask).float().numpy())
    return np.concatenate(out)


def piece_weights(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_length: int,
                  coefficient: float = SIF_COEFFICIENT) -> np.ndarray:
    """Smooth inverse frequency per vocabulary piece, ``a / (a + p)`` with ``p`` its share of the pieces of
    ``texts`` (1 for a piece they never use): frequent pieces (``[CLS]``, "the") count little in the mean."""
    counts: Counter = Counter()
    for ids in piece_ids(tokenizer, texts, max_length):
        counts.update(ids)
    total = sum(counts.values())
    p = np.zeros(len(tokenizer), dtype=np.float64)
    if total:
        for piece, n in counts.items():
            p[piece] = n / total
    return (coefficient / (coefficient + p)).astype(np.float32)


def static_table(vectors: np.ndarray, dims: int, weights: np.ndarray, seed: int) -> np.ndarray:
    """The starting table: ``vectors`` reduced to ``dims`` principal components (scikit-learn's PCA, seeded) and
    scaled by ``weights``; a ModelError when the encoder is narrower than ``dims``."""
    from sklearn.decomposition import PCA

    if dims > vectors.shape[1]:
        raise ModelError(f"a static student of hidden_size {dims} cannot be made from an encoder of width "
                         f"{vectors.shape[1]}: set student.hidden_size to at most {vectors.shape[1]}")
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(vectors) if dims < vectors.shape[1] \
        else vectors - vectors.mean(0)
    return (reduced * weights[:, None]).astype(np.float32)


def build_static_student(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, labels: list[str],
                         hidden_size: int, texts: Iterable[str], max_length: int, seed: int) -> StaticEmbeddingClassifier:
    """A static student for ``labels`` over ``tokenizer``'s vocabulary, its table made from ``encoder`` as model2vec
    does and weighted by the pieces' frequency in ``texts``; the head is drawn from torch's seeded generator."""
    table = static_table(piece_vectors(encoder, tokenizer), hidden_size, piece_weights(tokenizer, texts, max_length),
                         seed)
    config = StaticConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, head_size=hidden_size,
                          pad_token_id=tokenizer.pad_token_id or 0, num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    model = StaticEmbeddingClassifier(config)
    with torch.no_grad():
        # scaled so the mean of a text has about the spread the head's initial weights expect
        model.embeddings.weight.copy_(torch.from_numpy(table / max(float(table.std()), 1e-6)))
    return model

