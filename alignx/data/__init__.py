"""Stage 1 (prepare) data package: sources -> examples -> injected, tokenized training rows.

Modules, in pipeline order:

* :mod:`alignx.data.schema` — ``Message``, ``Example``;
* :mod:`alignx.data.sources` — ``read_source`` and one reader per raw source
  (local files or the Hub), ``DataFormatError``;
* :mod:`alignx.data.templates` / :mod:`alignx.data.injection` — the versioned axis
  templates and ``inject``;
* :mod:`alignx.data.prepare` — ``prepare_axis`` / ``prepare_all`` / ``load_split``
  (Parquet splits + ``DataManifest``);
* :mod:`alignx.data.tokenize` — ``encode_sft`` (loss on response tokens only) and
  ``collate``, used inside the trainers (imports torch, so it is not imported here).
"""

from alignx.data.injection import inject
from alignx.data.schema import Example, Message
from alignx.data.sources import DataFormatError, read_source
from alignx.data.templates import TEMPLATES, PromptTemplate, default_template

__all__ = [
    "TEMPLATES",
    "DataFormatError",
    "Example",
    "Message",
    "PromptTemplate",
    "default_template",
    "inject",
    "read_source",
]
