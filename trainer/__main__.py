"""``python -m trainer train ...`` (see ``trainer.dpo``) and ``python -m trainer evaluate ...``
(see ``trainer.evaluate``, which has its own parser)."""

import os
import sys

if os.environ.get("PREFLOOP_DIE_WITH_PARENT"):  # started by a refresh: see trainer.lifeline
    from trainer.lifeline import die_with_parent

    die_with_parent()

if sys.argv[1:2] == ["evaluate"]:
    from trainer.evaluate import main

    raise SystemExit(main(sys.argv[2:]))

from trainer.dpo import main

raise SystemExit(main())
