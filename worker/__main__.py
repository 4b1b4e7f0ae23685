"""`python -m worker`: the model worker subprocess started by the supervisor."""

from worker.main import main

raise SystemExit(main())
