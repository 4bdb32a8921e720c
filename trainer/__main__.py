"""``python -m trainer train ...`` (see ``trainer.dpo``) and ``python -m trainer evaluate ...``
(see ``trainer.evaluate``, which has its own parser)."""

import sys

if sys.argv[1:2] == ["evaluate"]:
    from trainer.evaluate import main

    raise SystemExit(main(sys.argv[2:]))

from trainer.dpo import main

raise SystemExit(main())
