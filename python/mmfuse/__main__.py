"""`python -m mmfuse ...` is the same CLI as `mmfuse ...` (so `torchrun -m mmfuse` works)."""

from mmfuse.cli.main import main

raise SystemExit(main())
