"""Model cards (`README.md` with YAML metadata) as text -> text functions.

Transformers writes a model card only when pushing: the repo's card if it has one, else a new
one, with the model's tags merged into its `tags:` metadata. These functions do the text part
with huggingface_hub's `ModelCard`, so the metadata is read and written the way the Hub does.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import InvalidArgumentError

__all__ = ["merge_tags", "new_model_card", "tag_model_card"]

_DESCRIPTION = (
    "This model card was written by fmodel when the model was saved. The checkpoint is in the "
    "Hugging Face format (config.json + weights) and loads with Transformers' `from_pretrained`."
)


def merge_tags(existing: Iterable[str] | None, new: Iterable[str] | str | None) -> list[str]:
    """`existing` followed by each tag of `new` not already there (order kept, no duplicates).

    A single string counts as one tag, as in Transformers' `add_model_tags`.

    Example:
        >>> merge_tags(["a", "b"], ["b", "c", "c"])
        ['a', 'b', 'c']
    """
    out: list[str] = []
    for tag in [*(existing or ()), *([new] if isinstance(new, str) else (new or ()))]:
        if tag not in out:
            out.append(tag)
    return out


def new_model_card(tags: Iterable[str] = (), *, title: str | None = None) -> str:
    """A short model card whose metadata has `library_name: transformers` and `tags`.

    Transformers fills huggingface_hub's long template (which needs jinja2); fmodel writes a
    short body instead. The metadata, which is what the Hub reads, is the same.

    Arguments:
        tags: the `tags:` metadata, in order (duplicates dropped).
        title: a heading for the body (e.g. the repo name); none when None.

    Returns:
        The README.md text.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", tags=merge_tags((), tags))
    heading = f"# {title}\n\n" if title else ""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{heading}{_DESCRIPTION}\n"))


def tag_model_card(text: str, tags: Iterable[str], *, ignore_metadata_errors: bool = False) -> str:
    """`text` (a README.md) with `tags` added to its `tags:` metadata; nothing else changes.

    When every tag is already there, `text` itself is returned (the file stays byte-identical);
    otherwise the YAML block is rewritten by huggingface_hub (keys keep their order, YAML
    comments in the block are lost) and the body is kept as is. A README without metadata
    gains a block holding only the tags.

    Arguments:
        text: the current card.
        tags: tags to add, in order.
        ignore_metadata_errors: as in huggingface_hub and Transformers: metadata that is valid
            YAML but cannot be interpreted (a malformed `model-index`) is dropped instead of
            raising (that information is then lost from the card).

    Returns:
        The new card text.

    Raises:
        ValueError: the metadata block is not valid YAML, or (unless `ignore_metadata_errors`)
            cannot be interpreted.
    """
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=ignore_metadata_errors)
    except yaml.YAMLError as exc:
        raise InvalidArgumentError(
            f"README.md: its metadata block is not valid YAML; fix the lines between the '---' markers ({exc})"
        ) from None
    except ValueError as exc:
        raise InvalidArgumentError(f"README.md: {exc}") from None
    merged = merge_tags(card.data.tags, tags)
    if merged == list(card.data.tags or ()):
        return text
    card.data.tags = merged
    return str(card)
