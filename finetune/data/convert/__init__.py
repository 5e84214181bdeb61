"""Convert other tools' datasets, and CSV/JSONL tables through a template, into our JSONL.

Sources:

- ``llamafactory``: LLaMA-Factory ShareGPT-style records (``messages`` with
  role/content, or ``conversations`` with from/value; alpaca
  ``instruction``/``input``/``output`` too) whose text holds ``<image>``,
  ``<audio>``, ``<video>`` placeholders, with ``images``/``audios``/``videos``
  list columns. The number of placeholders must equal the number of files.
  Also its v1 records (``text``/``image_url``/``audio_url``/``video_url``
  parts with ``value``, a ``loss_weight`` per turn: 0 on an answer keeps it as
  context, ``"loss": false`` here), and a dataset named through its list as
  ``folder/dataset_info.json#name`` (file_name, formatting, columns, tags;
  media relative to the list's folder, as LLaMA-Factory's media_dir).
- ``swift``: ms-swift records: the same ``messages`` + media columns (and
  ``query``/``response``/``history``). Like ms-swift, files without a
  placeholder are put at the start of the first user turn; more placeholders
  than files is an error.
- ``openai``: OpenAI chat ``messages`` whose content is a list of ``text``,
  ``image_url``, ``input_audio`` (and ``audio_url``/``video_url``) parts that
  point to **local** files. Remote URLs are refused: nothing is downloaded.
- ``ours``: our own format (re-written with paths relative to the output).
- a table (CSV/TSV/JSONL/JSON list) plus a YAML template (see
  ``data_templates/README.md``).

Every record-level problem is a :class:`~finetune.data.schema.DataError` that
names the file, the line (or ``record[i]`` for JSON lists), the field and a
fix. ``on_error="skip"`` collects them instead of raising. A record another
converter reads is refused with that converter's ``--from`` (never one that
refuses it in turn). Preference data (chosen/rejected answers, in any of the
forms LLaMA-Factory, ms-swift or we write) is one error for the whole file.

Files given as data (``data.train``, ``data check``) are read with
:func:`read_converted`: the format is recognised from the first records, and
media must lie inside the dataset's folder unless data.allow_outside_paths, as
for our JSONL.

Usage (also ``python -m finetune data convert ...``)::

    python -m finetune.data.convert --template T.yaml table.csv out.jsonl
    python -m finetune.data.convert --from llamafactory data.json out.jsonl
    python -m finetune.data.convert data/dataset_info.json#mllm_demo out.jsonl

Modules, each importing only from those above it in this list:

- ``records``: locations, results, reading records, media paths, roles, writing our JSONL;
- ``sharegpt``: placeholder records (LLaMA-Factory sharegpt/alpaca, ms-swift);
- ``openai``: OpenAI chat records;
- ``llamafactory``: LLaMA-Factory v1 records, ``dataset_info.json``, the ShareGPT writer;
- ``detect``: which format a record or a file is in, preference data;
- ``ours``: our own format;
- ``files``: a file through its converter (:func:`convert_file`, :func:`read_converted`);
- ``table``: a table through a template;
- ``cli``: ``data convert``.
"""

from finetune.data.convert.cli import main
from finetune.data.convert.detect import detect_format, dominant_format
from finetune.data.convert.files import FORMATS, convert_file, read_converted
from finetune.data.convert.llamafactory import (
    dataset_ref,
    llamafactory_dataset_info,
    llamafactory_from_ours,
    write_llamafactory,
)
from finetune.data.convert.records import ConvertResult, atomic_write, sample_to_dict, write_jsonl
from finetune.data.convert.table import (
    TABLE_SUFFIXES,
    Template,
    TemplatePart,
    TemplateTurn,
    convert_table,
    load_template,
)

__all__ = [
    "FORMATS",
    "TABLE_SUFFIXES",
    "ConvertResult",
    "Template",
    "TemplatePart",
    "TemplateTurn",
    "atomic_write",
    "convert_file",
    "convert_table",
    "dataset_ref",
    "detect_format",
    "dominant_format",
    "llamafactory_dataset_info",
    "llamafactory_from_ours",
    "load_template",
    "main",
    "read_converted",
    "sample_to_dict",
    "write_jsonl",
    "write_llamafactory",
]
