"""Auto-class registration (`register_for_auto_class`): which names are valid, and why fmodel
writes no `auto_map`.

In Transformers, registering a *custom* model class makes `save_pretrained` copy the file that
defines the class into the checkpoint and write `"auto_map": {"AutoModel": "module.Class"}` into
config.json; Transformers' Auto classes then load the checkpoint by importing that file
(remote code, `trust_remote_code=True`).

fmodel records the registration the same way (`cls._auto_class`) but never writes an
`auto_map`: every class fmodel saves is one of Transformers' own architectures, named in
`architectures` with its `model_type`, so Transformers' Auto classes already load the checkpoint
with their built-in code. An `auto_map` would instead make Transformers refuse the checkpoint
without `trust_remote_code=True` and then import fmodel's facade module from the checkpoint
folder, which cannot run there (it is part of a package, not a standalone modeling file).
"""

from __future__ import annotations

from ..errors import InvalidArgumentError

__all__ = ["AUTO_MODEL_CLASSES", "auto_class_name"]

# The model Auto classes of Transformers 4.57 (`transformers.models.auto`); the tests check this
# list against the installed Transformers.
AUTO_MODEL_CLASSES: tuple[str, ...] = (
    "AutoModel",
    "AutoModelForAudioClassification",
    "AutoModelForAudioFrameClassification",
    "AutoModelForAudioTokenization",
    "AutoModelForAudioXVector",
    "AutoModelForCTC",
    "AutoModelForCausalLM",
    "AutoModelForDepthEstimation",
    "AutoModelForDocumentQuestionAnswering",
    "AutoModelForImageClassification",
    "AutoModelForImageSegmentation",
    "AutoModelForImageTextToText",
    "AutoModelForImageToImage",
    "AutoModelForInstanceSegmentation",
    "AutoModelForKeypointDetection",
    "AutoModelForKeypointMatching",
    "AutoModelForMaskGeneration",
    "AutoModelForMaskedImageModeling",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModelForObjectDetection",
    "AutoModelForPreTraining",
    "AutoModelForQuestionAnswering",
    "AutoModelForSemanticSegmentation",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForTableQuestionAnswering",
    "AutoModelForTextEncoding",
    "AutoModelForTextToSpectrogram",
    "AutoModelForTextToWaveform",
    "AutoModelForTimeSeriesPrediction",
    "AutoModelForTokenClassification",
    "AutoModelForUniversalSegmentation",
    "AutoModelForVideoClassification",
    "AutoModelForVision2Seq",
    "AutoModelForVisualQuestionAnswering",
    "AutoModelForZeroShotImageClassification",
    "AutoModelForZeroShotObjectDetection",
    "AutoModelWithLMHead",
)


def auto_class_name(auto_class: str | type) -> str:
    """The name of a model Auto class, given as a string or a class (Transformers' or fmodel's).

    Stricter than Transformers, which accepts any attribute of `transformers.models.auto`
    (`AutoTokenizer` included): a model can only be registered with a model Auto class.

    Raises:
        ValueError: not one of `AUTO_MODEL_CLASSES`.

    Example:
        >>> auto_class_name(fmodel.facade.AutoModelForCausalLM)
        'AutoModelForCausalLM'
    """
    name = auto_class if isinstance(auto_class, str) else getattr(auto_class, "__name__", repr(auto_class))
    if name not in AUTO_MODEL_CLASSES:
        raise InvalidArgumentError(
            f"{name} is not a valid auto class: expected a model Auto class such as 'AutoModel' or "
            "'AutoModelForCausalLM'"
        )
    return name
