"""``python -m finetune.data.convert``: the same as ``python -m finetune data convert``."""

import sys

from finetune.data.convert.cli import main

sys.exit(main(sys.argv[1:]))
