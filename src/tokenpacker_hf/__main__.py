# Copyright 2026 The tokenpacker_hf authors. Licensed under the Apache License, Version 2.0.
"""`python -m tokenpacker_hf ...` is the `tokenpacker-hf` command."""

import sys

from .cli import main

sys.exit(main())
