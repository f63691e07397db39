"""Translation quality rewards: MetricX(-QE) and xCOMET, loaded from local paths only.

What loads, honestly:

- MetricX (google/metricx-23/24-*): the checkpoints are MT5 encoder-decoders saved under a custom
  ``MT5ForRegression`` class. Their weights load into transformers' MT5ForConditionalGeneration;
  the score is the logit of one vocabulary entry (``regression_token_id``, 250089 =
  ``<extra_id_10>``) at the first decoder step with decoder input id 0, clipped to [0, 25]
  (an error score: lower is better). Inputs follow MetricX-24: "source: S candidate: H"
  (+ " reference: R" in hybrid mode), with the tokenizer's final EOS removed, as MetricX does.
  The checkpoints ship no tokenizer: set ``tokenizer_path`` to a local google/mt5-xl (or
  mt5-large) tokenizer, which needs sentencepiece (``pip install 'moepost[reward]'``).
  Any other config (``head: sequence_classification``) is read as a converted or fine-tuned QE
  model: AutoModelForSequenceClassification with num_labels=1, whose one logit is the score.
- xCOMET (Unbabel/XCOMET-XL): a COMET checkpoint (a ``.ckpt`` file or a folder holding
  ``checkpoints/model.ckpt``) is loaded with the unbabel-comet package
  (``comet.load_from_checkpoint``). A folder with a config.json is read as a Hugging Face
  sequence-classification checkpoint (num_labels=1) scoring "hypothesis <sep> source".

Rewards: MetricX ``reward_transform="linear"`` (default) gives 1 - clip(score, 0, 25) / 25 in
[0, 1]; "negate" gives -score. xCOMET's score (in [0, 1], higher is better) is the reward.
Scorers are cached per (kind, path, tokenizer path, device, dtype, head), so each rank loads a
reward model once, on its own ``device``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from moepost.components.data.prompting import apply_prompt_template, postprocess_translation
from moepost.components.rewards.convention import texts as completion_texts
from moepost.errors import UserError

METRICX_MAX_SCORE = 25.0
METRICX_QE_TEMPLATE = "source: {source} candidate: {hypothesis}"
METRICX_HYBRID_TEMPLATE = "source: {source} candidate: {hypothesis} reference: {reference}"
XCOMET_QE_TEMPLATE = "{hypothesis}{sep}{source}"
XCOMET_REF_TEMPLATE = "{hypothesis}{sep}{source}{sep}{reference}"
_INSTALL_HINT = "pip install 'moepost[reward]'"

Head = Literal["auto", "mt5_regression", "sequence_classification"]


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"reward model dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


_TOKENIZER_FILES = (
    "tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt",
    "vocab.json",
)  # fmt: skip


def _load_tokenizer(path: str, kind: str) -> Any:
    from transformers import AutoTokenizer

    # transformers builds an empty tokenizer for a T5 folder without vocabulary files; refuse it.
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(
            f"{kind}: no tokenizer files in {path} (MetricX checkpoints ship none: set "
            f"tokenizer_path to a local google/mt5-xl)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except ImportError as exc:
        raise UserError(f"{kind}: loading the tokenizer at {path} needs {_INSTALL_HINT}") from exc
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{kind}: no usable tokenizer at {path} (moepost never downloads reward models: "
            f"give a local folder): {exc}"
        ) from exc
    if tokenizer.pad_token_id is None:
        raise UserError(f"{kind}: the tokenizer at {path} has no pad token")
    return tokenizer


def _model_type(path: str, kind: str) -> str | None:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True).model_type
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{kind}: no model config at {path} (moepost never downloads reward models: give a "
            f"local folder): {exc}"
        ) from exc


class TranslationQEScorer:
    """A Hugging Face regression model that scores (source, hypothesis[, reference]) texts.

    ``head="mt5_regression"``: MetricX's MT5 head (see the module docstring);
    ``head="sequence_classification"``: one logit of AutoModelForSequenceClassification.
    """

    def __init__(
        self,
        path: str,
        *,
        kind: str,
        head: Head = "sequence_classification",
        tokenizer_path: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        regression_token_id: int = 250089,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, MT5ForConditionalGeneration

        self.kind, self.head = kind, head
        self.device = torch.device(device)
        self.regression_token_id = regression_token_id
        self.tokenizer = _load_tokenizer(tokenizer_path or path, kind)
        is_mt5 = head == "mt5_regression"
        model_cls = MT5ForConditionalGeneration if is_mt5 else AutoModelForSequenceClassification
        try:
            model = model_cls.from_pretrained(path, dtype=_dtype(dtype), local_files_only=True)
        except OSError as exc:
            raise UserError(
                f"{kind}: cannot load a model from {path} (moepost never downloads reward "
                f"models: give a local folder): {exc}"
            ) from exc
        if not is_mt5 and model.config.num_labels != 1:
            raise UserError(f"{kind}: {path} has num_labels={model.config.num_labels}, expected 1")
        if is_mt5 and regression_token_id >= model.config.vocab_size:
            raise UserError(
                f"{kind}: regression_token_id {regression_token_id} is outside the vocabulary "
                f"({model.config.vocab_size}) of {path}"
            )
        model.to(self.device)  # type: ignore[arg-type]  # transformers' decorated `to` confuses mypy
        self.model = model.eval()

    def _encode(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        # model_max_length keeps XLM-R-style models inside their 512 position embeddings.
        max_length = min(max_length, self.tokenizer.model_max_length)
        ids = self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if self.head == "mt5_regression" and eos is not None:  # MetricX drops the final EOS
            ids = [row[:-1] if row and row[-1] == eos else row for row in ids]
        return ids

    @torch.inference_mode()
    def _forward(self, batch_ids: list[list[int]]) -> list[float]:
        padded = self.tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)  # [B, T]
        attention_mask = padded["attention_mask"].to(self.device)  # [B, T]
        if self.head == "mt5_regression":
            # MetricX reads one decoder step from start id 0 and takes a fixed vocabulary logit.
            decoder_input_ids = torch.zeros_like(input_ids[:, :1])  # [B, 1]
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
            ).logits  # [B, 1, V]
            scores = logits[:, 0, self.regression_token_id]
        else:
            scores = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        return scores.float().cpu().tolist()

    def score_texts(
        self, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 1536
    ) -> list[float]:
        """Raw model scores for already formatted inputs, batched by length to limit padding."""
        ids = self._encode(texts, max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        scores: list[float] = [0.0] * len(ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for index, value in zip(chunk, self._forward([ids[i] for i in chunk])):
                scores[index] = value
        return scores

    def format_inputs(
        self,
        sources: Sequence[str],
        hypotheses: Sequence[str],
        references: Sequence[str] | None,
        template: str,
    ) -> list[str]:
        sep = f" {self.tokenizer.sep_token} " if self.tokenizer.sep_token else "\n"
        rows = []
        for i, (source, hypothesis) in enumerate(zip(sources, hypotheses)):
            row = {"source": source, "hypothesis": hypothesis, "sep": sep}
            row["reference"] = references[i] if references is not None else ""
            rows.append(apply_prompt_template(template, row))
        return rows


class MetricXQE:
    """MetricX error scores in [0, 25] (lower is better) for (source, hypothesis[, reference])."""

    def __init__(self, path: str, *, head: Head = "auto", **load_kwargs: Any) -> None:
        if head == "auto":
            is_t5 = _model_type(path, "metricx") in ("mt5", "t5", "umt5")
            head = "mt5_regression" if is_t5 else "sequence_classification"
        self.scorer = TranslationQEScorer(path, kind="metricx", head=head, **load_kwargs)

    def score(
        self,
        sources: Sequence[str],
        hypotheses: Sequence[str],
        references: Sequence[str] | None = None,
        *,
        template: str | None = None,
        batch_size: int = 8,
        max_length: int = 1536,
    ) -> list[float]:
        default = METRICX_QE_TEMPLATE if references is None else METRICX_HYBRID_TEMPLATE
        texts = self.scorer.format_inputs(sources, hypotheses, references, template or default)
        raw = self.scorer.score_texts(texts, batch_size=batch_size, max_length=max_length)
        return [min(max(s, 0.0), METRICX_MAX_SCORE) for s in raw]


def metricx_to_reward(scores: Sequence[float], transform: str = "linear") -> list[float]:
    """'linear': 1 - clip(score, 0, 25) / 25 (in [0, 1]); 'negate': -score."""
    if transform == "linear":
        return [1.0 - min(max(s, 0.0), METRICX_MAX_SCORE) / METRICX_MAX_SCORE for s in scores]
    if transform == "negate":
        return [-s for s in scores]
    raise UserError(f"metricx reward_transform must be 'linear' or 'negate', got {transform!r}")


def _is_comet_checkpoint(path: str) -> bool:
    p = Path(path)
    return p.suffix == ".ckpt" or (p / "checkpoints" / "model.ckpt").is_file()


class XCOMET:
    """xCOMET scores in [0, 1] (higher is better), via unbabel-comet or an HF checkpoint."""

    def __init__(self, path: str, *, device: str = "cpu", **load_kwargs: Any) -> None:
        self.device = torch.device(device)
        self.comet_model: Any = None
        self.scorer: TranslationQEScorer | None = None
        if _is_comet_checkpoint(path):
            try:
                import comet
            except ImportError as exc:
                raise UserError(
                    f"xcomet: {path} is a COMET checkpoint, which needs the unbabel-comet "
                    f"package: {_INSTALL_HINT} unbabel-comet"
                ) from exc
            ckpt = path if path.endswith(".ckpt") else str(Path(path) / "checkpoints/model.ckpt")
            self.comet_model = comet.load_from_checkpoint(ckpt)
        else:
            self.scorer = TranslationQEScorer(
                path, kind="xcomet", head="sequence_classification", device=device, **load_kwargs
            )

    def score(
        self,
        sources: Sequence[str],
        hypotheses: Sequence[str],
        references: Sequence[str] | None = None,
        *,
        template: str | None = None,
        batch_size: int = 8,
        max_length: int = 512,
    ) -> list[float]:
        if self.comet_model is not None:
            samples = [{"src": s, "mt": h} for s, h in zip(sources, hypotheses)]
            for sample, ref in zip(samples, references or []):
                sample["ref"] = ref
            on_gpu = self.device.type == "cuda"
            devices = [self.device.index or 0] if on_gpu else None
            output = self.comet_model.predict(
                samples, batch_size=batch_size, gpus=int(on_gpu), devices=devices,
                progress_bar=False,
            )  # fmt: skip
            return [float(s) for s in output.scores]
        assert self.scorer is not None
        default = XCOMET_QE_TEMPLATE if references is None else XCOMET_REF_TEMPLATE
        texts = self.scorer.format_inputs(sources, hypotheses, references, template or default)
        return self.scorer.score_texts(texts, batch_size=batch_size, max_length=max_length)


_SCORERS: dict[tuple[Any, ...], MetricXQE | XCOMET] = {}


def get_scorer(
    kind: Literal["metricx", "xcomet"],
    path: str,
    *,
    device: str = "cpu",
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    head: Head = "auto",
    regression_token_id: int = 250089,
) -> MetricXQE | XCOMET:
    """The cached scorer for these load settings; built (model loaded) on first use."""
    key = (kind, str(path), tokenizer_path, device, dtype, head, regression_token_id)
    if key not in _SCORERS:
        load = partial(MetricXQE, head=head, regression_token_id=regression_token_id)
        scorer = load if kind == "metricx" else XCOMET
        _SCORERS[key] = scorer(str(path), device=device, tokenizer_path=tokenizer_path, dtype=dtype)
    return _SCORERS[key]


def clear_scorer_cache() -> None:
    """Drop every cached reward model (frees its device memory once unreferenced)."""
    _SCORERS.clear()


def _translation_inputs(
    kind: str,
    completions: Sequence[str],
    columns: dict[str, Any],
    *,
    source_key: str,
    reference_key: str,
    use_reference: bool,
    postprocess: bool,
) -> tuple[list[str], list[str], list[str] | None]:
    def column(key: str) -> list[str]:
        if key not in columns:
            available = ", ".join(sorted(columns)) or "(none)"
            raise UserError(f"{kind} reward needs a '{key}' column; the data has: {available}")
        values = [str(v) for v in columns[key]]
        if len(values) != len(completions):
            raise UserError(f"{kind} reward: column '{key}' is not aligned with the completions")
        return values

    hypotheses = [
        postprocess_translation(c) if postprocess else c for c in completion_texts(completions)
    ]
    references = column(reference_key) if use_reference else None
    return column(source_key), hypotheses, references


def _model_path(kind: str, path: str | None) -> str:
    if not path:
        raise UserError(f"{kind} reward needs 'path' (a local model folder)")
    return path


def metricx_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    path: str | None = None,
    tokenizer_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    head: Head = "auto",
    regression_token_id: int = 250089,
    batch_size: int = 8,
    max_length: int = 1536,
    template: str | None = None,
    use_reference: bool = False,
    reward_transform: str = "linear",
    postprocess: bool = True,
    source_key: str = "source",
    reference_key: str = "reference",
    **columns: Any,
) -> list[float]:
    """MetricX-QE reward (TRL convention) from the ``source`` column and the completions.

    Completions go through :func:`postprocess_translation` unless ``postprocess`` is false;
    ``use_reference`` adds the ``reference`` column (MetricX-24 hybrid input).
    """
    # Check the data and options before loading a multi-GB model.
    sources, hypotheses, references = _translation_inputs(
        "metricx", completions, columns, source_key=source_key, reference_key=reference_key,
        use_reference=use_reference, postprocess=postprocess,
    )  # fmt: skip
    metricx_to_reward([], reward_transform)
    scorer = get_scorer(
        "metricx", _model_path("metricx", path), device=device, tokenizer_path=tokenizer_path,
        dtype=dtype, head=head, regression_token_id=regression_token_id,
    )  # fmt: skip
    scores = scorer.score(
        sources, hypotheses, references,
        template=template, batch_size=batch_size, max_length=max_length,
    )  # fmt: skip
    return metricx_to_reward(scores, reward_transform)


def xcomet_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    path: str | None = None,
    tokenizer_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    max_length: int = 512,
    template: str | None = None,
    use_reference: bool = False,
    postprocess: bool = True,
    source_key: str = "source",
    reference_key: str = "reference",
    **columns: Any,
) -> list[float]:
    """xCOMET reward (TRL convention): the score in [0, 1] of each post-processed completion."""
    sources, hypotheses, references = _translation_inputs(
        "xcomet", completions, columns, source_key=source_key, reference_key=reference_key,
        use_reference=use_reference, postprocess=postprocess,
    )  # fmt: skip
    scorer = get_scorer(
        "xcomet", _model_path("xcomet", path), device=device, tokenizer_path=tokenizer_path,
        dtype=dtype,
    )  # fmt: skip
    return scorer.score(
        sources, hypotheses, references,
        template=template, batch_size=batch_size, max_length=max_length,
    )  # fmt: skip
