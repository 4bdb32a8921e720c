"""``python -m trainer train ...``: see ``trainer.dpo``."""

from trainer.dpo import main

raise SystemExit(main())
